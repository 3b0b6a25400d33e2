"""Convolutions reshaped so every vector of output channels is whole and belongs to one group.

* ``SplitGroupedConv``: a grouped NHWC convolution with a few groups (ShuffleNet: 4 groups of 68
  channels) becomes one kernel over a group axis when it is pointwise (1x1, stride 1: a batched
  matmul (pixels, groups, 1, in) x (groups, in, out)), else one dense convolution per group and a
  concat; either way output channels are zero-padded to whole vectors per group. Vectorised over output channels, a grouped convolution's vector spans
  two groups whenever the group width is not a multiple of the vector, and its input reads become
  gathers: ShuffleNet's grouped 1x1 layers ran at 6 GFLOP/s. Split per group, ShuffleNet ran
  ~1160 kernel and VM calls per inference, and the concat of the groups (fused with the batch
  norm that follows, its index a select over the groups) cost as much as the convolutions. Depthwise convolutions (one input
  channel per group) and convolutions with more than ``max_groups`` groups are left as they are.
* ``PadConvChannels``: a dense convolution whose output channels are not a multiple of the
  vector is padded to whole vectors when that wastes at most a fifth of the work (SqueezeNet's
  1000-class 1x1 layer ran on half vectors, 8 being the largest of 1000's factors that fits),
  then sliced back; an odd number of vectors (9 up, not a multiple of 3) gets one more.

Both run after ConvertLayout (NHWC data, HWIO constant weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, static_shape

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_STRIDED_SLICE = tvm.ir.Op.get("relax.strided_slice")
_ADD = tvm.ir.Op.get("relax.add")
# elementwise operators of a requantizing epilogue: (operator, takes a second operand)
_ELEMENTWISE = {tvm.ir.Op.get(f"relax.{name}"): binary for name, binary in (
    ("add", True), ("subtract", True), ("multiply", True), ("divide", True), ("maximum", True),
    ("minimum", True), ("round", False), ("astype", False), ("nn.relu", False))}
_ASTYPE = tvm.ir.Op.get("relax.astype")
# a per-tensor dequantize's scalar steps (after an astype)
_SCALAR_DEQUANTIZE = {tvm.ir.Op.get("relax.subtract"), tvm.ir.Op.get("relax.multiply")}
MAX_SPLIT_GROUPS = 8  # SplitGroupedConv's default: more groups keep their grouped kernel


def _nhwc_conv_weight(rewriter: Any, call: relax.Call) -> np.ndarray | None:
    """The constant HWIO weight of an NHWC conv2d, else None."""
    attrs = call.attrs
    if call.op != _CONV2D or attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" \
            or attrs.out_layout != "NHWC":
        return None
    seen = bound_value(rewriter, call.args[1])
    if not isinstance(seen, tvm.ir.expr.Constant):
        return None
    weight: np.ndarray = seen.value.numpy()
    return weight if weight.ndim == 4 else None


def _conv(data: Any, weight: np.ndarray, attrs: Any) -> relax.Expr:
    return relax.op.nn.conv2d(
        data, relax.const(weight), strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
        groups=1, data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC", out_dtype=attrs.out_dtype)


@mutator
class _GroupSplitter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, max_groups: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.max_groups = max_groups

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        weight = _nhwc_conv_weight(self, call) if call.op == _CONV2D else None
        if weight is None:
            return call
        groups = int(call.attrs.groups)
        kh, kw, cg_in, k = weight.shape
        if groups < 2 or groups > self.max_groups or cg_in == 1 or k % groups:
            return call  # dense, depthwise or many-group convolutions keep their kernel
        cg_out = k // groups
        padded = _group_width(cg_out, self.lanes)
        if _is_pointwise(call.attrs, kh, kw) and _static_shape(call.args[0]) is not None:
            return self._group_matmul(call, weight, groups, padded)
        parts = []
        for g in range(groups):
            x = self.builder_.emit(relax.op.strided_slice(call.args[0], axes=[3], begin=[g * cg_in],
                                                          end=[(g + 1) * cg_in]))
            w = np.zeros((kh, kw, cg_in, padded), dtype=weight.dtype)
            w[..., :cg_out] = weight[..., g * cg_out:(g + 1) * cg_out]
            y = self.builder_.emit(_conv(x, w, call.attrs))
            if padded != cg_out:
                y = self.builder_.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[cg_out]))
            parts.append(y)
        return relax.op.concat(parts, axis=3)

    def _group_matmul(self, call: relax.Call, weight: np.ndarray, groups: int, padded: int) -> relax.Expr:
        """The pointwise grouped conv as one batched matmul over a group axis: (pixels, groups,
        1, in) x (groups, in, out) needs only reshapes of the NHWC data, and the default schedule
        tiles it like a conv (pixels x output-channel vectors, the group axis outermost)."""
        n, h, w, _ = _static_shape(call.args[0]) or (0, 0, 0, 0)
        _, _, cg_in, k = weight.shape
        cg_out = k // groups
        packed = np.zeros((groups, cg_in, padded), dtype=weight.dtype)
        packed[..., :cg_out] = weight[0, 0].reshape(cg_in, groups, cg_out).transpose(1, 0, 2)
        x = self.builder_.emit(relax.op.reshape(call.args[0], (n * h * w, groups, 1, cg_in)))
        extra = -cg_in % 4 if weight.dtype in (np.int8, np.int16) else 0
        if extra:  # integer kernels: whole 4-channel steps (vpdpbusd, sdot; 2 x vpmaddwd); the added weights are 0
            x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, 0, 0, extra], pad_value=0.0))
            packed = np.concatenate([packed, np.zeros((groups, extra, padded), dtype=packed.dtype)], axis=1)
        y = self.builder_.emit(relax.op.matmul(x, relax.const(packed), out_dtype=call.attrs.out_dtype))
        if padded != cg_out:
            y = self.builder_.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[cg_out]))
        return relax.op.reshape(y, (n, h, w, k))


def has_8bit_tensors(mod: tvm.IRModule) -> bool:
    """Whether a Relax function of ``mod`` binds an int8 or uint8 tensor (a quantized model)."""
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                ty = getattr(binding.var, "ty", None)
                if isinstance(ty, relax.TensorType) and str(ty.dtype) in ("int8", "uint8"):
                    return True
    return False


def _ints(expr: Any) -> list[int] | None:
    """The integers of a tuple argument (strided_slice's axes, begin), else None."""
    fields = getattr(expr, "fields", None)
    try:
        return None if fields is None else [int(getattr(f, "value", f)) for f in fields]
    except (TypeError, ValueError):
        return None


def _group_width(channels: int, lanes: int) -> int:
    """Output channels per group, padded to whole vectors; one vector more when that makes the
    count of vectors even or a multiple of three (a 2- or 3-vector register tile) for at most a
    fifth more work (AVX2: 136 -> 144: 17 vectors allow only one-vector tiles)."""
    padded = -(-channels // lanes) * lanes
    vectors = padded // lanes
    if vectors > 1 and vectors % 2 and vectors % 3 and (padded + lanes - channels) * 5 <= channels:
        return padded + lanes
    return padded


def _static_shape(expr: Any) -> tuple[int, ...] | None:
    """The static 4-D shape of a tensor expression, else None."""
    shape = static_shape(expr)
    return shape if shape is not None and len(shape) == 4 else None


def _is_pointwise(attrs: Any, kh: int, kw: int) -> bool:
    """A 1x1 convolution reading every pixel once (stride 1, no padding, no dilation)."""
    return (kh, kw) == (1, 1) and all(int(v) == 1 for v in (*attrs.strides, *attrs.dilation)) \
        and all(int(v) == 0 for v in attrs.padding)


def _pad_to_vector_pairs(vectors: int) -> bool:
    """Whether a conv with this odd number of whole output-channel vectors gets one more: the
    2-vector tile (ADR 0025) needs an even count, 3 vectors take an odd multiple of three
    (ADR 0020), and one more vector wastes at most an eighth from 9 vectors up (SqueezeNet's
    1000 classes on AVX2: 125 vectors left a 1-vector tile, 13 pixels, load bound)."""
    return vectors % 2 == 1 and vectors % 3 != 0 and vectors >= 9


@mutator
class _EpilogueAboveReshape(PyExprMutator):
    """``e(reshape(slice(m)), c)`` -> ``reshape(slice(e(m, c')))`` for an integer group matmul ``m``
    (pixels, groups, 1, padded) and an elementwise ``e`` with a per-channel constant ``c`` (``c'``: the same
    values per group, zero-padded to the padded width). The reshape to NHWC is a view (a VM call, no kernel):
    below it, the requantizing epilogue ran as a separate kernel reading the s32 accumulators back
    (ShuffleNet: 0.1-0.3 ms each); above it, the epilogue fuses into the matmul's write-back. With ``fp32``
    the same for fp32 group matmuls, and a residual add too (ADR 0044); with ``integer_residuals`` the residual
    add after an integer group matmul's dequantizing epilogue too (ADR 0051)."""

    def __init__(self, mod: tvm.IRModule, fp32: bool, integer_residuals: bool = True) -> None:
        super().__init__(mod)
        self.fp32 = fp32
        self.integer_residuals = integer_residuals  # residual adds after an s32 group matmul's epilogue (ADR 0051)
        self.rewritten = 0
        self.above: dict[Any, bool] = {}  # values this rewrite moved above a reshape: rooted at an fp32 matmul

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        binary = _ELEMENTWISE.get(call.op)
        if binary is None or len(call.args) != (2 if binary else 1):
            return call
        found = self._group_matmul_view(call.args[0])
        if found is None:
            return call
        source, width, shape, fp32 = found
        args = [source]
        if binary:
            per_group = self._per_group(call.args[1], shape, width, _static_shape(source)[3])  # type: ignore[index]
            if per_group is None:
                # an integer matmul's dequantized result: its residual add too (VNNI targets only make s32
                # matmuls; an 8-bit model's fp32 matmuls keep the add below, see transform_module)
                return self._residual_above_reshape(call, source, width, shape) \
                    if fp32 or self.integer_residuals else call
            args.append(per_group)
        y = self.builder_.emit(relax.Call(call.op, args, call.attrs))
        self.above[y] = fp32
        if width != _static_shape(y)[3]:  # type: ignore[index]
            y = self.builder_.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[width]))
        self.rewritten += 1
        return relax.op.reshape(y, shape)

    def _residual_above_reshape(self, call: relax.Call, source: Any, width: int, shape: tuple[int, ...]) -> Any:
        """``add(reshape(slice(m)), r)``, ``r`` an fp32 NHWC tensor (a residual) -> ``reshape(add(slice(m),
        reshape(r)))``: the residual's view per (pixel, group, channel) costs nothing, and the add (and the relu
        after it) joins the matmul's kernel instead of a separate pass over both tensors (ADR 0044)."""
        if call.op != _ADD or str(call.ty.dtype) != "float32" or static_shape(call.args[1]) != shape:
            return call
        padded = _static_shape(source)
        assert padded is not None
        if width != padded[3]:
            source = self.builder_.emit(relax.op.strided_slice(source, axes=[3], begin=[0], end=[width]))
        residual = self._residual_view(call.args[1], (*padded[:3], width))
        y = self.builder_.emit(relax.op.add(source, residual))
        self.above[y] = True
        self.rewritten += 1
        return relax.op.reshape(y, shape)

    def _residual_view(self, residual: Any, view: tuple[int, ...]) -> Any:
        """``reshape(residual, view)``; a residual dequantized per tensor (``astype(r) * s``, an 8-bit model's,
        through reshapes) as the same ops on ``r`` in ``view``: the view of the 8-bit tensor is free (the previous
        unit's result is computed in it), and the elementwise ops fuse into the matmul's kernel (a reshape between
        them and the add stops FuseOps: it ran as a kernel of its own)."""
        ops = []
        x = residual
        while isinstance(seen := bound_value(self, x), relax.Call):
            if seen.op == _RESHAPE:
                x = seen.args[0]
            elif seen.op == _ASTYPE:
                ops.append((seen, None))
                x = seen.args[0]
                break  # the dequantize's cast (of an 8-bit tensor, checked below)
            elif seen.op in _SCALAR_DEQUANTIZE and isinstance(c := bound_value(self, seen.args[1]), tvm.ir.expr.Constant) \
                    and c.value.numpy().size == 1:
                ops.append((seen, seen.args[1]))
                x = seen.args[0]
            else:
                break
        if not ops or str(getattr(x.ty, "dtype", "")) not in ("int8", "uint8"):
            return self.builder_.emit(relax.op.reshape(residual, view))
        y = x if static_shape(x) == view else self.builder_.emit(relax.op.reshape(x, view))
        for op, operand in reversed(ops):
            y = self.builder_.emit(relax.Call(op.op, [y] if operand is None else [y, operand], op.attrs))
        return y

    def _group_matmul_view(self, expr: Any) -> tuple[Any, int, tuple[int, ...], bool] | None:
        """(the (pixels, groups, 1, padded) value, channels per group, NHWC shape, rooted at an fp32 matmul) of
        ``expr`` = ``reshape(strided_slice(value) or value, NHWC)``, value an integer group matmul (with ``fp32``:
        or an fp32 one) or moved above."""
        view = bound_value(self, expr)
        if not isinstance(view, relax.Call) or view.op != _RESHAPE:
            return None
        shape = _static_shape(view)
        value = view.args[0]
        inner = bound_value(self, value)
        width = None
        if isinstance(inner, relax.Call) and inner.op == _STRIDED_SLICE and _ints(inner.args[1]) == [3] \
                and _ints(inner.args[2]) == [0]:
            width = _static_shape(inner)
            value = inner.args[0]
            inner = bound_value(self, value)
        source_shape = _static_shape(value)
        if shape is None or source_shape is None or source_shape[2] != 1:
            return None
        matmul = isinstance(inner, relax.Call) and inner.op == _MATMUL
        integer = matmul and str(inner.attrs.out_dtype) == "int32"
        fp32 = matmul and self.fp32 and str(inner.ty.dtype) == "float32"
        if not integer and not fp32 and value not in self.above:
            return None
        fp32 = fp32 or self.above.get(value, False)
        per_group = source_shape[3] if width is None else width[3]
        pixels, groups = source_shape[0], source_shape[1]
        if shape[0] * shape[1] * shape[2] != pixels or shape[3] != groups * per_group:
            return None
        return value, per_group, shape, fp32

    def _per_group(self, operand: Any, shape: tuple[int, ...], width: int, padded_width: int) -> Any | None:
        """``operand`` (a scalar or per-channel constant of the NHWC value) per (group, channel), padded."""
        seen = bound_value(self, operand)
        if not isinstance(seen, tvm.ir.expr.Constant):
            return None
        c = seen.value.numpy()
        if c.size == 1:
            return seen
        if c.ndim > 4 or c.shape[-1] != shape[3] or c.size != shape[3]:
            return None
        groups = shape[3] // width
        padded = np.zeros((groups, 1, padded_width), dtype=c.dtype)
        padded[..., :width] = c.reshape(groups, 1, width)
        return relax.const(padded)


@mutator
class _ChannelPadder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        weight = _nhwc_conv_weight(self, call) if call.op == _CONV2D else None
        if weight is None or int(call.attrs.groups) != 1:
            return call
        k = weight.shape[3]
        if k < self.lanes or (k % self.lanes == 0 and not _pad_to_vector_pairs(k // self.lanes)):
            return call
        padded = -(-k // (2 * self.lanes)) * 2 * self.lanes  # two vectors: the widest tile
        if (padded - k) * 8 > k:
            padded = -(-k // self.lanes) * self.lanes
        if (padded - k) * 5 > k:
            return call
        w = np.zeros((*weight.shape[:3], padded), dtype=weight.dtype)
        w[..., :k] = weight
        y = self.builder_.emit(_conv(call.args[0], w, call.attrs))
        return relax.op.strided_slice(y, axes=[3], begin=[0], end=[k])


@tvm.transform.module_pass(opt_level=0, name="KilnSplitGroupedConv")
class SplitGroupedConv:
    """Grouped NHWC convolutions with 2..``max_groups`` groups -> one padded dense conv per group + concat;
    ``fp32_epilogues``: fp32 pointwise ones take their epilogue and residual add above the NHWC reshape too."""

    def __init__(self, lanes: int, max_groups: int = MAX_SPLIT_GROUPS, fp32_epilogues: bool = True) -> None:
        self.lanes = lanes
        self.max_groups = max_groups
        self.fp32_epilogues = fp32_epilogues

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        split = rewrite_functions(mod, _GroupSplitter(mod, self.lanes, self.max_groups))
        # an 8-bit model's fp32 matmuls (no VNNI, ADR 0021) requantize: its residuals are dequantized by
        # elementwise ops that fuse into the add below the reshape, so 8-bit models keep ADR 0041's rule
        above = _EpilogueAboveReshape(split, self.fp32_epilogues and not has_8bit_tensors(split))
        out = rewrite_functions(split, above)
        # the epilogue's old chain below the reshape is dead now
        return relax.transform.DeadCodeElimination()(out) if above.rewritten else out


@tvm.transform.module_pass(opt_level=0, name="KilnPadConvChannels")
class PadConvChannels:
    """Dense NHWC convolutions padded to whole vectors of output channels (<= 20% waste), then sliced."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _ChannelPadder(mod, self.lanes))
