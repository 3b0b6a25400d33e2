"""``ConvToBF16``: convolutions and matrix products with constant weights computed in bf16, accumulated in fp32.

For ``CompilerOptions {"precision": "bf16"}``. Each NHWC/HWIO conv2d (after ``cpu_graph_passes``)
whose channels fit the ``vdpbf16ps`` kernel's block (``schedules.bf16``: 16 output x 2 input
channels) and each matmul with a constant right-hand side becomes the same operator over a bf16
cast of its input and a bf16 weight, with ``out_dtype="float32"``: products are exact in fp32 and
summed in fp32, so only the operands are rounded (bf16 keeps fp32's exponent and 8 of its 24
significand bits). What follows (bias, batch norm, residual add, relu) stays fp32; the casts of the
weights are folded at compile time. A convolution with an odd number of input channels (the RGB
stem) gets one zero channel on its input and weight. Grouped pointwise convolutions (the batched
matmul of ``SplitGroupedConv``) are converted where their channels fit the block (ADR 0042);
depthwise and other grouped convolutions stay fp32.

Activations cross layers in bf16 where that is exact (ADR 0036): each tensor is cast once, however
many convolutions read it, and the cast moves above concatenations and max pools (rounding is
monotone: ``round(max(x)) == max(round(x))``, and a concatenation only moves values), so it fuses
into the epilogue of the convolution that produced the value and the concatenation and pool move
half the bytes. Average pools, residual adds and anything else that computes stay fp32.

Two further rules (ADR 0049), off by default until a quiet-host A/B shows a gain: ``bf16_residuals`` (an
identity block's add reads its shortcut from the bf16 copy its first convolution reads) and ``fold_scales``
(batch-norm scales after a bf16 convolution folded into its weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, static_shape

# The vdpbf16ps kernel's block: 16 output channels (one zmm of fp32) x 2 input channels per lane.
BF16_BLOCK_OC = 16
BF16_BLOCK_IC = 2

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONCAT = tvm.ir.Op.get("relax.concat")
_MAX_POOL2D = tvm.ir.Op.get("relax.nn.max_pool2d")
_ADD = tvm.ir.Op.get("relax.add")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")


def _dtype(expr: Any) -> str:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


def _channel_constant(expr: Any, channels: int) -> np.ndarray | None:
    """``expr`` as a per-output-channel vector when it is a constant broadcast along the last axis only."""
    if not isinstance(expr, tvm.ir.expr.Constant) or _dtype(expr) != "float32":
        return None
    value = expr.value.numpy()
    if any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in (1, channels)):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype("float32")


@mutator
class _FoldChannelAffine(PyExprMutator):
    """Per-channel scales after a bf16-bound convolution folded into its weights (ADR 0049).

    A batch norm reaches this pass decomposed: ``((conv - mean) * a) * b + beta``, three vector operations in
    the convolution's epilogue (subtract, multiply, fused multiply-add) per output vector. Folded, the weights
    carry ``a * b`` and the epilogue adds one per-channel shift. In bf16 the scaled weight is what is rounded
    (as OpenVINO does), so the result moves by a bf16 rounding of the weight, as before; fp32 builds do not run
    this pass."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self._folded: set[Any] = set()  # the input's convolutions whose scales were folded
        self._values: dict[Any, Any] = {}  # the input functions' variables -> their values
        self._uses: dict[Any, int] = {}
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self._values.update(relax.analysis.get_var2val(func))
                for block in getattr(func.body, "blocks", []):
                    if isinstance(block, relax.DataflowBlock):
                        for var, users in relax.analysis.udchain(block).items():
                            self._uses[var] = len(users)

    def _value(self, expr: Any) -> Any:
        return self._values.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def _chain(self, call: relax.Call) -> tuple[relax.Call, np.ndarray, np.ndarray, int] | None:
        """(convolution, scale, shift, multiplies) with ``call == conv * scale + shift`` per output channel, walking
        single-use subtract/multiply/add by constants back to a bf16-fitting convolution; None otherwise."""
        ops: list[tuple[Any, np.ndarray]] = []
        node: Any = call
        while isinstance(node, relax.Call) and node.op in (_ADD, _SUBTRACT, _MULTIPLY) and len(node.args) == 2:
            data, const = node.args
            if node.op != _SUBTRACT and not isinstance(data, relax.Var):
                data, const = const, data
            shape = static_shape(data)
            if not isinstance(data, relax.Var) or not shape or len(shape) != 4 or self._uses.get(data, 0) != 1:
                return None
            vector = _channel_constant(const, shape[3])
            if vector is None:
                return None
            ops.append((node.op, vector))
            node = self._values.get(data)
        if not (isinstance(node, relax.Call) and node.op == _CONV2D and _conv_fits(node, self._value)):
            return None
        channels = static_shape(node)[3]  # type: ignore[index]
        scale, shift = np.ones(channels, "float32"), np.zeros(channels, "float32")
        for op, vector in reversed(ops):
            if op == _MULTIPLY:
                scale, shift = scale * vector, shift * vector
            else:
                shift = shift + vector if op == _ADD else shift - vector
        return node, scale, shift, sum(op == _MULTIPLY for op, _ in ops)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        chain = self._chain(call) if call.op in (_ADD, _SUBTRACT, _MULTIPLY) else None
        new = super().visit_call_(call)
        if chain is None or chain[3] == 0:
            return new
        conv, scale, shift, _ = chain
        data = self.visit_expr(conv.args[0])  # the data as rewritten so far
        weight = self._value(conv.args[1]).value.numpy() * scale  # HWIO: the scale multiplies the O axis
        a = conv.attrs
        folded = self.builder_.emit(relax.op.nn.conv2d(
            data, relax.const(weight.astype("float32")), strides=a.strides, padding=a.padding, dilation=a.dilation,
            groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout, out_layout=a.out_layout))
        self._folded.add(conv)  # each step of a chain emits a convolution; the earlier steps' ones are left unused
        return relax.op.add(folded, relax.const(shift.reshape(1, 1, 1, -1)))


def _conv_fits(call: relax.Call, value_of: Callable[[Any], Any]) -> bool:
    """Whether ``call`` (a conv2d) is one ConvToBF16 computes in bf16: NHWC/HWIO, one group, output channels
    whole 16-blocks, a constant weight (``value_of``: what a variable is bound to; odd input channels are padded
    by one zero channel)."""
    attrs = call.attrs
    if attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or int(attrs.groups) != 1:
        return False
    weight = static_shape(call.args[1])
    return (weight is not None and len(weight) == 4 and weight[3] % BF16_BLOCK_OC == 0
            and isinstance(value_of(call.args[1]), tvm.ir.expr.Constant))


@mutator
class _ToBF16(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hoist_casts: bool = True, bf16_residuals: bool = False) -> None:
        super().__init__(mod)
        self.converted = 0
        self.residuals = 0
        self.hoist_casts = hoist_casts
        self.bf16_residuals = bf16_residuals
        self._casts: dict[Any, relax.Expr] = {}  # fp32 variable -> its bf16 cast (one per tensor)

    def _cast(self, expr: relax.Expr) -> relax.Expr:
        """``expr`` in bf16: one cast per variable, moved above concatenations and max pools (exact)."""
        if not isinstance(expr, relax.Var):
            return relax.op.astype(expr, "bfloat16")
        if expr in self._casts:
            return self._casts[expr]
        value = bound_value(self, expr) if self.hoist_casts else expr
        cast: relax.Expr
        if isinstance(value, relax.Call) and value.op == _CONCAT and isinstance(value.args[0], relax.Tuple) \
                and all(_dtype(f) == "float32" for f in value.args[0].fields):
            parts = [self._cast(f) for f in value.args[0].fields]
            cast = relax.op.concat(parts, axis=int(value.attrs.axis))
        elif isinstance(value, relax.Call) and value.op == _MAX_POOL2D and _dtype(value.args[0]) == "float32":
            a = value.attrs
            cast = relax.op.nn.max_pool2d(self._cast(value.args[0]), pool_size=a.pool_size, strides=a.strides,
                                          padding=a.padding, dilation=a.dilation, ceil_mode=a.ceil_mode,
                                          count_include_pad=a.count_include_pad, layout=a.layout,
                                          out_layout=a.out_layout)
        else:
            cast = relax.op.astype(expr, "bfloat16")
        var = self.builder_.emit(cast)
        self._casts[expr] = var
        return var

    def _constant(self, expr: Any) -> bool:
        return isinstance(bound_value(self, expr), tvm.ir.expr.Constant)

    def _matmul_fits(self, call: relax.Call) -> bool:
        weight = static_shape(call.args[1])
        if weight is None or not self._constant(call.args[1]):
            return False
        if len(weight) == 2:
            return True
        # a grouped pointwise convolution as SplitGroupedConv writes it: (pixels, groups, 1, in) x
        # (groups, in, out), out padded to whole vectors; converted only where the 16x2 kernel fits
        data = static_shape(call.args[0])
        return (len(weight) == 3 and data is not None and len(data) == 4 and data[2] == 1
                and weight[1] % BF16_BLOCK_IC == 0 and weight[2] % BF16_BLOCK_OC == 0)

    def _residual_from_bf16(self, call: relax.Call) -> relax.Expr:
        """A residual add reads its shortcut from the bf16 copy the next convolution reads anyway (ADR 0049).

        The shortcut of an identity block (the previous block's output, also read by this block's first
        convolution) then has no fp32 reader left: the block that produces it writes bf16 only, and the
        add reads half the bytes. It rounds the shortcut once per block, as OpenVINO's bf16 does: this
        changes results. A projection shortcut (a convolution's result, no bf16 copy) stays fp32: cast
        and widened, FuseOps puts both casts in the producer's kernel, which then still writes fp32."""
        a, b = call.args
        if not (len(static_shape(a) or ()) == 4 and static_shape(a) == static_shape(b)
                and _dtype(a) == _dtype(b) == "float32"):
            return call
        for i, operand in enumerate((a, b)):
            if isinstance(operand, relax.Var) and operand in self._casts:
                widened = self.builder_.emit(relax.op.astype(self._casts[operand], "float32"))
                self.residuals += 1
                return relax.op.add(widened, b) if i == 0 else relax.op.add(a, widened)
        return call

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == _ADD and len(call.args) == 2 and self.bf16_residuals:
            return self._residual_from_bf16(call)
        if call.op not in (_CONV2D, _MATMUL) or len(call.args) != 2:
            return call
        if _dtype(call.args[0]) != "float32" or _dtype(call.args[1]) != "float32":
            return call
        fits = _conv_fits(call, lambda e: bound_value(self, e)) if call.op == _CONV2D else self._matmul_fits(call)
        if not fits:
            return call
        data = self._cast(call.args[0])
        constant = bound_value(self, call.args[1])
        self.converted += 1
        if call.op == _CONV2D and static_shape(constant)[2] % BF16_BLOCK_IC:  # type: ignore[index]
            # one zero input channel: a 3-channel stem becomes 4 (2 pairs), 33% more work at twice the rate
            w = constant.value.numpy()
            constant = relax.const(np.pad(w, [(0, 0), (0, 0), (0, 1), (0, 0)]))
            data = relax.op.nn.pad(data, [0, 0, 0, 0, 0, 0, 0, 1])
        weight = relax.op.astype(constant, "bfloat16")  # folded by FoldConstant
        if call.op == _CONV2D:
            a = call.attrs
            return relax.op.nn.conv2d(data, weight, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                      groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                      out_layout=a.out_layout, out_dtype="float32")
        return relax.op.matmul(data, weight, out_dtype="float32")


@tvm.transform.module_pass(opt_level=0, name="KilnConvToBF16")
class ConvToBF16:
    """Compute fitting conv2d (NHWC/HWIO) and constant-weight matmul in bf16 with fp32 accumulation."""

    def __init__(self, hoist_casts: bool = True, bf16_residuals: bool = False, fold_scales: bool = False) -> None:
        self.converted = 0
        self.folded = 0  # per-channel scale chains folded into convolution weights
        # ADR 0049's two rules are off by default: neither was faster in 1-thread A/Bs on the loaded host;
        # a quiet-host 2-thread A/B decides (bench/results/2026-12-02-bf16-s8.md)
        self.fold_scales = fold_scales  # True: batch-norm scales folded into the bf16 weights
        self.residuals = 0  # residual adds that read their shortcut in bf16
        self.hoist_casts = hoist_casts  # False: a cast per convolution input, below concat/pool (before ADR 0036)
        self.bf16_residuals = bf16_residuals  # True: identity shortcuts read from their bf16 copy

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.fold_scales:
            folder = _FoldChannelAffine(mod)
            mod = relax.transform.DeadCodeElimination()(rewrite_functions(mod, folder))
            self.folded = len(folder._folded)
        rewriter = _ToBF16(mod, self.hoist_casts, self.bf16_residuals)
        out = rewrite_functions(mod, rewriter)
        self.converted = rewriter.converted
        self.residuals = rewriter.residuals
        out = relax.transform.FoldConstant()(relax.transform.Normalize()(out))
        # the fp32 concatenations and pools whose casts moved above them are left unused
        return relax.transform.DeadCodeElimination()(out)
