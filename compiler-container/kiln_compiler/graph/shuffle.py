"""Channel shuffle (ShuffleNet) kept in NHWC.

ONNX spells a channel shuffle in NCHW: ``reshape(x, (N, g, C/g, H, W))``, swap axes 1 and 2,
``reshape(.., (N, C, H, W))``. Reshape is not layout-agnostic, so ConvertLayout wraps it in
transposes: NHWC -> NCHW, the shuffle, NCHW -> NHWC. Fused, that kernel's read index was a
chain of divisions and modulos over five 4-D/5-D views, per input and per fused batch-norm
constant (0.4-0.6 ms for a 28x28x136 map, slower than the convolution before it).
``ChannelShuffleNHWC`` replaces the chain by the same permutation of the channel axis in NHWC:
``reshape(x, (N, H, W, g, C/g))``, swap the last two axes, ``reshape(.., (N, H, W, C))``.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions

_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_RESHAPE = tvm.ir.Op.get("relax.reshape")


def _static(expr: Any) -> list[int] | None:
    """The static shape of a tensor expression, else None."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _axes(call: Any) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


@mutator
class _ShuffleToNHWC(PyExprMutator):
    def _call(self, expr: Any, op: Any) -> Any:
        seen = bound_value(self, expr)
        return seen if isinstance(seen, relax.Call) and seen.op == op else None

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        # to_nhwc(reshape(swap12(reshape(to_nchw(x), (n, g, c/g, h, w))), (n, c, h, w)))
        if call.op != _PERMUTE or _axes(call) != [0, 2, 3, 1]:
            return call
        merged = self._call(call.args[0], _RESHAPE)
        swapped = self._call(merged.args[0], _PERMUTE) if merged is not None else None
        if swapped is None or _axes(swapped) != [0, 2, 1, 3, 4]:
            return call
        split = self._call(swapped.args[0], _RESHAPE)
        to_nchw = self._call(split.args[0], _PERMUTE) if split is not None else None
        if to_nchw is None or _axes(to_nchw) != [0, 3, 1, 2]:
            return call
        x = to_nchw.args[0]
        nhwc, grouped, out = _static(x), _static(split), _static(call)
        if nhwc is None or grouped is None or out is None or len(nhwc) != 4 or len(grouped) != 5:
            return call
        n, h, w, c = nhwc
        if grouped[0] != n or grouped[3:] != [h, w] or grouped[1] * grouped[2] != c or out != nhwc:
            return call
        groups, per_group = grouped[1], grouped[2]
        y = self.builder_.emit(relax.op.reshape(x, (n, h, w, groups, per_group)))
        y = self.builder_.emit(relax.op.permute_dims(y, [0, 1, 2, 4, 3]))
        return relax.op.reshape(y, (n, h, w, c))


@tvm.transform.module_pass(opt_level=0, name="KilnChannelShuffleNHWC")
class ChannelShuffleNHWC:
    """NCHW channel shuffles between NHWC transposes -> the same shuffle in NHWC."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _ShuffleToNHWC(mod))
