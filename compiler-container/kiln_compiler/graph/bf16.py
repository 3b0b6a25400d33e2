"""``ConvToBF16``: convolutions and matrix products with constant weights computed in bf16, accumulated in fp32.

For ``CompilerOptions {"precision": "bf16"}``. Each NHWC/HWIO conv2d (after ``cpu_graph_passes``)
whose channels fit the ``vdpbf16ps`` kernel's block (``schedules.bf16``: 16 output x 2 input
channels) and each matmul with a constant right-hand side becomes the same operator over a bf16
cast of its input and a bf16 weight, with ``out_dtype="float32"``: products are exact in fp32 and
summed in fp32, so only the operands are rounded (bf16 keeps fp32's exponent and 8 of its 24
significand bits). What follows (bias, batch norm, residual add, relu, pooling) stays fp32; the
casts of the weights are folded at compile time, the casts of the activations fuse into the
kernel that produces them. A convolution with an odd number of input channels (the RGB stem) gets
one zero channel on its input and weight. Depthwise and grouped convolutions stay fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions

# The vdpbf16ps kernel's block: 16 output channels (one zmm of fp32) x 2 input channels per lane.
BF16_BLOCK_OC = 16
BF16_BLOCK_IC = 2

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")


def _static_shape(expr: Any) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):
        return None


def _dtype(expr: Any) -> str:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


@mutator
class _ToBF16(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.converted = 0

    def _constant(self, expr: Any) -> bool:
        return isinstance(bound_value(self, expr), tvm.ir.expr.Constant)

    def _conv_fits(self, call: relax.Call) -> bool:
        attrs = call.attrs
        if attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or int(attrs.groups) != 1:
            return False
        weight = _static_shape(call.args[1])
        # odd input channels (an RGB stem) are padded by one zero channel below
        return (weight is not None and len(weight) == 4 and weight[3] % BF16_BLOCK_OC == 0
                and self._constant(call.args[1]))

    def _matmul_fits(self, call: relax.Call) -> bool:
        weight = _static_shape(call.args[1])
        return weight is not None and len(weight) == 2 and self._constant(call.args[1])

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op not in (_CONV2D, _MATMUL) or len(call.args) != 2:
            return call
        if _dtype(call.args[0]) != "float32" or _dtype(call.args[1]) != "float32":
            return call
        if not (self._conv_fits(call) if call.op == _CONV2D else self._matmul_fits(call)):
            return call
        data = relax.op.astype(call.args[0], "bfloat16")
        constant = bound_value(self, call.args[1])
        self.converted += 1
        if call.op == _CONV2D and _static_shape(constant)[2] % BF16_BLOCK_IC:  # type: ignore[index]
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

    def __init__(self) -> None:
        self.converted = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _ToBF16(mod)
        out = rewrite_functions(mod, rewriter)
        self.converted = rewriter.converted
        return relax.transform.FoldConstant()(relax.transform.Normalize()(out))
