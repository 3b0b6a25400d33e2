"""QOperator ONNX models rewritten to the equivalent QDQ form before import (ADR 0028).

onnxruntime's ``quantize_static(..., quant_format=QuantFormat.QOperator)`` writes quantized
operators (``QLinearConv``, com.microsoft ``QLinearAdd``, ``QGemm``, ...) that TVM 0.27's ONNX
frontend refuses. Each is the composition ``DequantizeLinear -> float op -> QuantizeLinear`` of
its inputs' and output's scales and zero points, which is what a QDQ model spells out; rewritten
so, the graph takes Kiln's integer path (``kiln_compiler.graph.quantized``): ``QLinearConv``
becomes ``DQ(x) -> Conv(DQ(W, axis 0), DQ(B, s_x * s_w)) -> Q``, exactly the chain onnxruntime's
QDQ quantizer writes, so it compiles to u8 x s8 -> s32 convolutions with the requantization
fused, and activations stay 8-bit between layers.

``ConvInteger`` (``quantize_dynamic``) becomes an int32 convolution of ``x - z_x`` and
``W - z_w``: exact, the same integer result. ``MatMulInteger`` and ``DynamicQuantizeLinear``
need no rewrite (the frontend imports them). Any other quantized operator is refused with a
``ClientError`` naming it.

The rewritten graph is only handed to TVM's frontend: a per-channel ``DequantizeLinear`` carries
its ``axis`` whatever the model's opset (the frontend reads it at every version; ONNX's checker
would want opset 13 for it), so the model keeps its opset and every other operator its meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ClientError

_MS = "com.microsoft"


def _is_default(node: Any) -> bool:
    return node.domain in ("", "ai.onnx")


def _key(node: Any) -> tuple[str, str]:
    return ("" if _is_default(node) else node.domain, node.op_type)


def uses_qoperators(model: Any) -> bool:
    """Whether ``model``'s graph holds a quantized operator that :func:`to_qdq` rewrites."""
    return any(_key(n) in _REWRITES for n in model.graph.node)


class _Rewriter:
    """Builds the QDQ graph node by node; knows the model's constants and tensor element types."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and _is_default(node) and len(node.attribute) == 1 \
                    and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.types: dict[str, int] = {i.name: i.data_type for i in graph.initializer}
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                self.types[info.name] = info.type.tensor_type.elem_type
        self.names = {o for n in graph.node for o in n.output} | set(self.types) | {n.name for n in graph.node}
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.node: Any = None  # the node being rewritten
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)

    # -- names and constants --------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = f"{self.node.name or self.node.output[0]}/{hint}"
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, hint: str, value: Any) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        self.constants[name] = np.asarray(value)
        self.types[name] = self.initializers[-1].data_type
        return name

    def emit(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | None = None, **attrs: Any) -> str:
        from onnx import helper

        outs = list(outputs) if outputs is not None else [self.fresh(op_type)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0]

    # -- quantization helpers -------------------------------------------------------------------
    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)

    def zero_point(self, zp: str, like: str) -> str:
        """``zp``, or a zero of ``like``'s element type when the optional zero point is omitted
        (a QuantizeLinear without one would make uint8 whatever the operator's type)."""
        if zp:
            return zp
        from onnx import helper

        elem = self.elem_type(like)
        if elem is None:
            raise ClientError(f"the {self.node.op_type} node '{self.node.name}' omits its output zero point and the "
                              f"type of its input '{like}' is not known; give the zero point explicitly")
        return self.const("zero_point", np.zeros((), helper.tensor_dtype_to_np_dtype(elem)))

    def dequantize(self, x: str, scale: str, zp: str, axis: int | None = None) -> str:
        """``DequantizeLinear``; ``axis`` only for a scale that is not one known value (per channel)."""
        known = self.constants.get(scale)
        per_channel = axis is not None and (known is None or known.size > 1)
        inputs = [x, scale, zp] if zp else [x, scale]
        return self.emit("DequantizeLinear", inputs, axis=axis) if per_channel else self.emit("DequantizeLinear", inputs)

    def quantize(self, y: str, scale: str, zp: str, output: str) -> str:
        self.types[output] = self.elem_type(zp) or 2  # TensorProto.UINT8, QuantizeLinear's default
        return self.emit("QuantizeLinear", [y, scale, zp], [output])

    def product(self, hint: str, factors: Sequence[str], times: float = 1.0) -> str:
        """The float32 product of scale tensors (a constant when they all are, as quantize_static writes them)."""
        values = [self.constants.get(f) for f in factors]
        if all(v is not None for v in values):
            out = np.asarray(times, dtype=np.float32)
            for v in values:
                assert v is not None
                out = (out * np.asarray(v, dtype=np.float32)).astype(np.float32)
            return self.const(hint, out)
        name = factors[0]
        for f in factors[1:]:
            name = self.emit("Mul", [name, f])
        return self.emit("Mul", [name, self.const(hint, np.float32(times))]) if times != 1.0 else name


def _inputs(node: Any, count: int) -> list[str]:
    """``node``'s first ``count`` inputs, '' for the optional ones it omits."""
    names = list(node.input)
    return names[:count] + [""] * (count - len(names))


def _attrs(node: Any, drop: Sequence[str] = ()) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def _refuse(node: Any, why: str) -> ClientError:
    return ClientError(f"the quantized operator {node.op_type} (node '{node.name}') {why}; Kiln compiles it only "
                       "in the form onnxruntime's quantize_static writes")


# -- one rewrite per operator: each emits the QDQ nodes for ``r.node`` -----------------------------

def _qlinear_conv(r: _Rewriter, node: Any) -> None:
    x, xs, xz, w, ws, wz, ys, yz, b = _inputs(node, 9)
    inputs = [r.dequantize(x, xs, xz), r.dequantize(w, ws, wz, axis=0)]
    if b:  # int32 bias with scale s_x * s_w (per output channel), zero point 0: as QLinearConv adds it
        inputs.append(r.dequantize(b, r.product("bias_scale", [xs, ws]), "", axis=0))
    r.quantize(r.emit("Conv", inputs, **_attrs(node)), ys, r.zero_point(yz, x), node.output[0])


def _qlinear_matmul(r: _Rewriter, node: Any) -> None:
    a, a_s, az, b, bs, bz, ys, yz = _inputs(node, 8)
    # a: per tensor or per row (axis -2), b: per tensor or per column (axis -1)
    product = r.emit("MatMul", [r.dequantize(a, a_s, az, axis=-2), r.dequantize(b, bs, bz, axis=-1)])
    r.quantize(product, ys, r.zero_point(yz, a), node.output[0])


def _qgemm(r: _Rewriter, node: Any) -> None:
    a, a_s, az, b, bs, bz, c, ys, yz = _inputs(node, 9)
    attrs = _attrs(node, drop=("beta",))
    alpha = float(attrs.get("alpha", 1.0))
    trans_b = int(attrs.get("transB", 0))
    inputs = [r.dequantize(a, a_s, az), r.dequantize(b, bs, bz, axis=0 if trans_b else 1)]
    if c:  # int32, scale alpha * s_a * s_b, zero point 0 (com.microsoft.QGemm): Y = alpha * A'B' + C'
        inputs.append(r.dequantize(c, r.product("bias_scale", [a_s, bs], times=alpha), "", axis=-1))
    if not ys:  # no output scale: the float result is the output
        r.emit("Gemm", inputs, [node.output[0]], **attrs)
        r.types[node.output[0]] = 1  # TensorProto.FLOAT
        return
    r.quantize(r.emit("Gemm", inputs, **attrs), ys, r.zero_point(yz, a), node.output[0])


def _binary(op_type: str) -> Callable[[_Rewriter, Any], None]:
    def rewrite(r: _Rewriter, node: Any) -> None:
        a, a_s, az, b, bs, bz, cs, cz = _inputs(node, 8)
        y = r.emit(op_type, [r.dequantize(a, a_s, az), r.dequantize(b, bs, bz)])
        r.quantize(y, cs, r.zero_point(cz, a), node.output[0])
    return rewrite


def _unary(op_type: str, keep: Sequence[str] = ()) -> Callable[[_Rewriter, Any], None]:
    def rewrite(r: _Rewriter, node: Any) -> None:
        x, xs, xz, ys, yz = _inputs(node, 5)
        attrs = _attrs(node)
        if attrs.pop("channels_last", 0):
            raise _refuse(node, "has channels_last=1 (NHWC), which has no ONNX float operator")
        unknown = sorted(set(attrs) - set(keep))
        if unknown:
            raise _refuse(node, f"has attribute(s) {unknown} that Kiln does not know for it")
        y = r.emit(op_type, [r.dequantize(x, xs, xz)], **attrs)
        r.quantize(y, ys, r.zero_point(yz, x), node.output[0])
    return rewrite


def _qlinear_concat(r: _Rewriter, node: Any) -> None:
    ys, yz, *triples = list(node.input)
    if not triples or len(triples) % 3:
        raise _refuse(node, f"has {len(node.input)} inputs; QLinearConcat takes Y_scale, Y_zero_point and "
                      "(X, X_scale, X_zero_point) per input")
    parts = [r.dequantize(*triples[i:i + 3]) for i in range(0, len(triples), 3)]
    r.quantize(r.emit("Concat", parts, **_attrs(node)), ys, r.zero_point(yz, triples[0]), node.output[0])


def _qlinear_softmax(r: _Rewriter, node: Any) -> None:
    x, xs, xz, ys, yz = _inputs(node, 5)
    model_opset = r.opset
    attrs = _attrs(node)
    axis, semantics = int(attrs.get("axis", -1)), int(attrs.get("opset", model_opset))
    deq = r.dequantize(x, xs, xz)
    if (semantics >= 13) == (model_opset >= 13) or axis == -1:  # the model's Softmax means the same
        y = r.emit("Softmax", [deq], axis=axis)
    elif semantics < 13:  # before opset 13: softmax over the input flattened to 2-D at ``axis``
        flat = r.emit("Softmax", [r.emit("Flatten", [deq], axis=axis)], axis=1)
        y = r.emit("Reshape", [flat, r.emit("Shape", [deq])])
    else:
        raise _refuse(node, f"computes softmax along axis {axis} alone (opset {semantics}), which this "
                      f"opset-{model_opset} model's Softmax cannot express")
    r.quantize(y, ys, r.zero_point(yz, x), node.output[0])


def _conv_integer(r: _Rewriter, node: Any) -> None:
    x, w, xz, wz = _inputs(node, 4)

    def centred(v: str, zp: str) -> str:
        v32 = r.emit("Cast", [v], to=6)  # TensorProto.INT32
        return r.emit("Sub", [v32, r.emit("Cast", [zp], to=6)]) if zp else v32

    # exact: the frontend imports an int32 Conv as an int32 convolution (the integers ConvInteger defines)
    r.emit("Conv", [centred(x, xz), centred(w, wz)], [node.output[0]], **_attrs(node))
    r.types[node.output[0]] = 6


_REWRITES: dict[tuple[str, str], Callable[[_Rewriter, Any], None]] = {
    ("", "QLinearConv"): _qlinear_conv,
    ("", "QLinearMatMul"): _qlinear_matmul,
    ("", "ConvInteger"): _conv_integer,
    (_MS, "QGemm"): _qgemm,
    (_MS, "QLinearAdd"): _binary("Add"),
    (_MS, "QLinearMul"): _binary("Mul"),
    (_MS, "QLinearConcat"): _qlinear_concat,
    (_MS, "QLinearGlobalAveragePool"): _unary("GlobalAveragePool"),
    (_MS, "QLinearAveragePool"): _unary("AveragePool", keep=("auto_pad", "ceil_mode", "count_include_pad",
                                                             "kernel_shape", "pads", "strides")),
    (_MS, "QLinearLeakyRelu"): _unary("LeakyRelu", keep=("alpha",)),
    (_MS, "QLinearSigmoid"): _unary("Sigmoid"),
    (_MS, "QLinearSoftmax"): _qlinear_softmax,
}


def _quantized(op_type: str) -> bool:
    """Whether a com.microsoft operator works on quantized tensors (QAttention, QLinearWhere, DynamicQuantizeLSTM,
    MatMulIntegerToFloat, QOrderedMatMul, ...)."""
    return op_type.startswith("Q") or "Quantize" in op_type or "Integer" in op_type


def unsupported_quantized_ops(model: Any) -> list[str]:
    """com.microsoft quantized operators in ``model`` that neither :func:`to_qdq` nor the frontend handle."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    frontend = _get_convert_map()
    return sorted({n.op_type for n in model.graph.node
                   if n.domain == _MS and _key(n) not in _REWRITES
                   and _quantized(n.op_type) and n.op_type not in frontend})


def prepare(model: Any) -> Any:
    """``model`` as TVM's frontend can import it: QOperator nodes rewritten (:func:`to_qdq`), unchanged otherwise;
    ClientError naming any quantized com.microsoft operator that has no rewrite."""
    if uses_qoperators(model) or unsupported_quantized_ops(model):
        return to_qdq(model)
    return model


def to_qdq(model: Any) -> Any:
    """A copy of ``model`` whose QOperator nodes are rewritten to DequantizeLinear -> op -> QuantizeLinear.

    ClientError naming the operator for a quantized operator without a rewrite, or one written
    in a form the rewrite does not cover (NHWC pools, unknown attributes)."""
    from onnx import ModelProto, helper

    refused = unsupported_quantized_ops(model)
    if refused:
        raise ClientError(f"the ONNX model uses quantized operator(s) {refused} that the compiler does not support "
                          "(supported: " + ", ".join(sorted(op for _, op in _REWRITES)) + ", MatMulInteger and QDQ "
                          "models); quantize the model with quant_format=QuantFormat.QDQ instead")
    out = ModelProto()
    out.CopyFrom(model)
    rewriter = _Rewriter(out)
    for node in out.graph.node:
        key = _key(node)
        rewriter.node = node
        if key in _REWRITES:
            _REWRITES[key](rewriter, node)
        else:
            rewriter.nodes.append(node)
            if key == ("", "QuantizeLinear"):
                rewriter.types[node.output[0]] = rewriter.types.get(_inputs(node, 3)[2], 2)
            elif node.output and node.input and node.input[0] in rewriter.types and node.op_type not in (
                    "DequantizeLinear", "Cast", "Shape", "Size"):
                # pools, reshapes, transposes of a quantized tensor keep its type (used for omitted zero points)
                rewriter.types.setdefault(node.output[0], rewriter.types[node.input[0]])
    if not any(o.domain == "" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("", rewriter.opset))
    del out.graph.node[:]
    out.graph.node.extend(rewriter.nodes)
    out.graph.initializer.extend(rewriter.initializers)
    return out
