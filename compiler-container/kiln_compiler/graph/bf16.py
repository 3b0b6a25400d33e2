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
"""

from __future__ import annotations

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


def _dtype(expr: Any) -> str:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


def _conv_layout(call: relax.Call) -> bool:
    a = call.attrs
    return a.data_layout == "NHWC" and a.kernel_layout == "HWIO" and int(a.groups) == 1


@mutator
class _ToBF16(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hoist_casts: bool = True) -> None:
        super().__init__(mod)
        self.converted = 0
        self.hoist_casts = hoist_casts
        self._casts: dict[Any, relax.Expr] = {}  # fp32 variable -> its bf16 cast (one per tensor)
        # inputs of convolutions with whole 16-channel blocks: a convolution short of them reading the same
        # tensor is padded (ADR 0053: Inception's 24-channel 5x5 reductions kept the modules' concats in fp32)
        self._bf16_inputs: set[Any] = set()
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                for value in relax.analysis.get_var2val(func).values():
                    if isinstance(value, relax.Call) and value.op == _CONV2D and _conv_layout(value):
                        weight = static_shape(value.args[1])
                        if weight is not None and len(weight) == 4 and weight[3] % BF16_BLOCK_OC == 0:
                            self._bf16_inputs.add(value.args[0])

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

    def _conv_fits(self, call: relax.Call) -> bool:
        if not _conv_layout(call):
            return False
        weight = static_shape(call.args[1])
        # odd input channels (an RGB stem) are padded by one zero channel below; output channels short of
        # 16-blocks only where other bf16 convolutions read the same input
        return (weight is not None and len(weight) == 4 and self._constant(call.args[1])
                and (weight[3] % BF16_BLOCK_OC == 0 or call.args[0] in self._bf16_inputs))

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

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op not in (_CONV2D, _MATMUL) or len(call.args) != 2:
            return call
        if _dtype(call.args[0]) != "float32" or _dtype(call.args[1]) != "float32":
            return call
        if not (self._conv_fits(call) if call.op == _CONV2D else self._matmul_fits(call)):
            return call
        data = self._cast(call.args[0])
        constant = bound_value(self, call.args[1])
        self.converted += 1
        if call.op == _CONV2D and static_shape(constant)[2] % BF16_BLOCK_IC:  # type: ignore[index]
            # one zero input channel: a 3-channel stem becomes 4 (2 pairs), 33% more work at twice the rate
            w = constant.value.numpy()
            constant = relax.const(np.pad(w, [(0, 0), (0, 0), (0, 1), (0, 0)]))
            data = relax.op.nn.pad(data, [0, 0, 0, 0, 0, 0, 0, 1])
        channels = static_shape(constant)[-1]  # type: ignore[index]
        if call.op == _CONV2D and channels % BF16_BLOCK_OC:
            # zero output channels up to whole 16-blocks, sliced off in the kernel's tiles (ADR 0042)
            w = constant.value.numpy()
            constant = relax.const(np.pad(w, [(0, 0), (0, 0), (0, 0), (0, -channels % BF16_BLOCK_OC)]))
        weight = relax.op.astype(constant, "bfloat16")  # folded by FoldConstant
        if call.op == _CONV2D:
            a = call.attrs
            conv = relax.op.nn.conv2d(data, weight, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                      groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                      out_layout=a.out_layout, out_dtype="float32")
            if channels % BF16_BLOCK_OC == 0:
                return conv
            return relax.op.strided_slice(self.builder_.emit(conv), axes=[3], begin=[0], end=[channels])
        return relax.op.matmul(data, weight, out_dtype="float32")


@tvm.transform.module_pass(opt_level=0, name="KilnConvToBF16")
class ConvToBF16:
    """Compute fitting conv2d (NHWC/HWIO) and constant-weight matmul in bf16 with fp32 accumulation."""

    def __init__(self, hoist_casts: bool = True) -> None:
        self.converted = 0
        self.hoist_casts = hoist_casts  # False: a cast per convolution input, below concat/pool (before ADR 0036)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _ToBF16(mod, self.hoist_casts)
        out = rewrite_functions(mod, rewriter)
        self.converted = rewriter.converted
        out = relax.transform.FoldConstant()(relax.transform.Normalize()(out))
        # the fp32 concatenations and pools whose casts moved above them are left unused
        return relax.transform.DeadCodeElimination()(out)
