"""Channel shuffle (ShuffleNet) kept in NHWC.

ONNX spells a channel shuffle in NCHW: ``reshape(x, (N, g, C/g, H, W))``, swap axes 1 and 2,
``reshape(.., (N, C, H, W))``. Reshape is not layout-agnostic, so ConvertLayout wraps it in
transposes: NHWC -> NCHW, the shuffle, NCHW -> NHWC. Fused, that kernel's read index was a
chain of divisions and modulos over five 4-D/5-D views, per input and per fused batch-norm
constant (0.4-0.6 ms for a 28x28x136 map, slower than the convolution before it).
``ChannelShuffleNHWC`` replaces the chain by the same permutation of the channel axis in NHWC:
``reshape(x, (N, H, W, g, C/g))``, swap the last two axes, ``reshape(.., (N, H, W, C))``, and
moves it above the per-channel ops that compute ``x`` (batch norm's scale and shift, relu; their
constants permuted alike) while each result has no other use: the shuffle then reads the
grouped convolution's output directly and the constants are read in order, not gathered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, static_shape

_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_PER_CHANNEL = {tvm.ir.Op.get(f"relax.{name}"): getattr(relax.op, name) for name in ("add", "subtract", "multiply")}


def use_counts(mod: tvm.IRModule) -> dict[Any, int]:
    """How many bindings of its dataflow block use each dataflow variable of ``mod``."""
    counts: dict[Any, int] = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        for block in func.body.blocks:
            if isinstance(block, relax.DataflowBlock):
                for var, users in relax.analysis.udchain(block).items():
                    counts[var] = len(users)
    return counts


def _axes(call: Any) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


@mutator
class _ShuffleToNHWC(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.uses = use_counts(mod)

    def _call(self, expr: Any, op: Any) -> Any:
        seen = bound_value(self, expr)
        return seen if isinstance(seen, relax.Call) and seen.op == op else None

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        # to_nhwc(reshape(swap12(reshape(to_nchw(x), (n, g, c/g, h, w))), (n, c, h, w)))
        if call.op != _PERMUTE or _axes(call) != [0, 2, 3, 1]:
            return call
        merged = self._call(call.args[0], _RESHAPE)
        # an 8-bit shuffle feeding an fp32 convolution on integers (ADR 0035): the cast follows it
        cast = self._call(call.args[0], _ASTYPE) if merged is None else None
        if cast is not None:
            merged = self._call(cast.args[0], _RESHAPE)
        swapped = self._call(merged.args[0], _PERMUTE) if merged is not None else None
        if swapped is None or _axes(swapped) != [0, 2, 1, 3, 4]:
            return call
        split = self._call(swapped.args[0], _RESHAPE)
        to_nchw = self._call(split.args[0], _PERMUTE) if split is not None else None
        if to_nchw is None or _axes(to_nchw) != [0, 3, 1, 2]:
            return call
        x = to_nchw.args[0]
        nhwc, grouped, out = static_shape(x), static_shape(split), static_shape(call)
        if nhwc is None or grouped is None or out is None or len(nhwc) != 4 or len(grouped) != 5:
            return call
        n, h, w, c = nhwc
        if grouped[0] != n or grouped[3:] != (h, w) or grouped[1] * grouped[2] != c or out != nhwc:
            return call
        groups, per_group = grouped[1], grouped[2]
        x, ops = self._per_channel_chain(x, c) if cast is None else (x, [])
        y = self.builder_.emit(relax.op.reshape(x, (n, h, w, groups, per_group)))
        y = self.builder_.emit(relax.op.permute_dims(y, [0, 1, 2, 4, 3]))
        y = relax.op.reshape(y, (n, h, w, c))
        if cast is not None:
            y = relax.op.astype(self.builder_.emit(y), str(cast.attrs.dtype))
        # channel s of the shuffle is channel (s % g) * (C/g) + s // g of its input
        order = np.arange(c).reshape(groups, per_group).T.reshape(-1)
        for op, const, const_first in reversed(ops):
            y = self.builder_.emit(y)
            if op is None:
                y = relax.op.nn.relu(y)
                continue
            permuted = relax.const(np.ascontiguousarray(const[..., order]))
            y = op(permuted, y) if const_first else op(y, permuted)
        return y

    def _per_channel_chain(self, x: Any, channels: int) -> tuple[Any, list[tuple[Any, Any, bool]]]:
        """The value below the relus and per-channel constant ops that compute ``x`` alone, and
        those ops (outermost first): (op or None for relu, the constant's values, constant first)."""
        ops: list[tuple[Any, Any, bool]] = []
        while isinstance(x, relax.Var) and self.uses.get(x) == 1:
            call = bound_value(self, x)
            if not isinstance(call, relax.Call) or static_shape(call) != static_shape(x):
                break
            if call.op == _RELU:
                ops.append((None, None, False))
                x = call.args[0]
                continue
            if call.op not in _PER_CHANNEL:
                break
            consts = [bound_value(self, a) for a in call.args]
            side = next((i for i, a in enumerate(consts) if isinstance(a, tvm.ir.expr.Constant)), None)
            if side is None:
                break
            value = consts[side].value.numpy()
            other = call.args[1 - side]
            if static_shape(other) != static_shape(x) or value.ndim != 4 or value.shape[:3] != (1, 1, 1) \
                    or value.shape[3] != channels:
                break
            ops.append((_PER_CHANNEL[call.op], value, side == 0))
            x = other
        return x, ops


@tvm.transform.module_pass(opt_level=0, name="KilnChannelShuffleNHWC")
class ChannelShuffleNHWC:
    """NCHW channel shuffles between NHWC transposes -> the same shuffle in NHWC."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _ShuffleToNHWC(mod))
