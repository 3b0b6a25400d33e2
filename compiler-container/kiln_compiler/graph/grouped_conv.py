"""Convolutions reshaped so every vector of output channels is whole and belongs to one group.

* ``SplitGroupedConv``: a grouped NHWC convolution with a few groups (ShuffleNet: 4 groups of 68
  channels) becomes one dense convolution per group, output channels zero-padded to whole
  vectors, then a concat. Vectorised over output channels, a grouped convolution's vector spans
  two groups whenever the group width is not a multiple of the vector, and its input reads become
  gathers: ShuffleNet's grouped 1x1 layers ran at 6 GFLOP/s. Depthwise convolutions (one input
  channel per group) and convolutions with more than ``max_groups`` groups are left as they are.
* ``PadConvChannels``: a dense convolution whose output channels are not a multiple of the
  vector is padded to whole vectors when that wastes at most a fifth of the work (SqueezeNet's
  1000-class 1x1 layer ran on half vectors, 8 being the largest of 1000's factors that fits),
  then sliced back.

Both run after ConvertLayout (NHWC data, HWIO constant weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


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
        padded = -(-cg_out // self.lanes) * self.lanes
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
        if k % self.lanes == 0 or k < self.lanes:
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
    """Grouped NHWC convolutions with 2..``max_groups`` groups -> one padded dense conv per group + concat."""

    def __init__(self, lanes: int, max_groups: int = 8) -> None:
        self.lanes = lanes
        self.max_groups = max_groups

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _GroupSplitter(mod, self.lanes, self.max_groups))


@tvm.transform.module_pass(opt_level=0, name="KilnPadConvChannels")
class PadConvChannels:
    """Dense NHWC convolutions padded to whole vectors of output channels (<= 20% waste), then sliced."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _ChannelPadder(mod, self.lanes))
