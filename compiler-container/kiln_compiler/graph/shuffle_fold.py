"""A channel shuffle folded into the next grouped 1x1 convolution's input indexing (ShuffleNet, fp32).

ShuffleNet's unit is grouped 1x1 conv, batch norm, relu, channel shuffle, depthwise 3x3, batch norm,
grouped 1x1 conv. After ``ChannelShuffleNHWC`` the shuffle is a kernel of its own that only permutes
channels (reshape, swap the last two axes, reshape): a gather pass over the whole map each unit (ShuffleNet
``ml_c5``, 1 thread: 0.66 of 5.5 ms). A permutation of channels commutes with everything per channel, so
``ShuffleIntoGroupMatmul`` moves it below the depthwise convolution and the batch norm (their weights and
constants permuted alike) into the grouped matmul that reads the result: its input value for group ``g``,
channel ``k`` is read at the unshuffled channel ``(s % G) * (C / G) + s // G``, ``s = g * K + k`` (G: the
shuffle's groups). The matmul broadcasts one input value per reduction step, so the gathered index costs an
address computation per step, shared by every pixel and channel vector of the register tile; no kernel,
launch or buffer is left for the shuffle.

fp32 only: ``ConvToBF16`` and the int8 schedules recognise the grouped matmul as ``relax.matmul``; an
8-bit shuffle (a cast in its chain) is not matched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, static_shape
from .grouped_conv import has_8bit_tensors
from .shuffle import use_counts

_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_PER_CHANNEL = {tvm.ir.Op.get(f"relax.{name}"): getattr(relax.op, name) for name in ("add", "subtract", "multiply")}


def shuffled_group_matmul(x: te.Tensor, w: te.Tensor, shuffle_groups: int) -> te.Tensor:
    """``(pixels, groups, 1, out)``: the grouped matmul of ``w`` (groups, in, out) over the channel shuffle of
    ``x`` (pixels, channels) with ``shuffle_groups`` groups, the shuffle read through its index."""
    groups, width, out = (int(d) for d in w.shape)
    per_group = int(x.shape[1]) // shuffle_groups
    k = te.reduce_axis((0, width), name="k")

    def channel(g: Any, kk: Any) -> Any:
        s = g * width + kk
        return tirx.floormod(s, shuffle_groups) * per_group + tirx.floordiv(s, shuffle_groups)

    return te.compute((x.shape[0], groups, 1, out),
                      lambda p, g, _, j: te.sum(x[p, channel(g, k)] * w[g, k, j], axis=k), name="shuffled_matmul")


def _constant(mutator: Any, expr: Any) -> np.ndarray | None:
    seen = bound_value(mutator, expr)
    return seen.value.numpy() if isinstance(seen, tvm.ir.expr.Constant) else None


@mutator
class _ShuffleIntoMatmul(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.uses = use_counts(mod)
        self.rewritten = 0

    def _bound_call(self, expr: Any, op: Any) -> Any:
        seen = bound_value(self, expr)
        return seen if isinstance(seen, relax.Call) and seen.op == op else None

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != _MATMUL or str(call.ty.dtype) != "float32":
            return call
        weight = _constant(self, call.args[1])
        view = self._bound_call(call.args[0], _RESHAPE)
        if weight is None or weight.ndim != 3 or weight.dtype != np.float32 or view is None \
                or self.uses.get(call.args[0]) != 1:
            return call
        z, grouped = view.args[0], static_shape(view)
        nhwc = static_shape(z)
        if nhwc is None or grouped is None or len(nhwc) != 4 or len(grouped) != 4 or grouped[2] != 1 \
                or grouped[1:2] + grouped[3:] != weight.shape[:2] or grouped[1] * grouped[3] != nhwc[3]:
            return call
        found = self._per_channel_chain_to_shuffle(z, nhwc[3])
        if found is None:
            return call
        v, shuffle_groups, ops = found
        # channel s of the shuffle is channel order[s] of its input: each op's channel c of v is its channel inv[c]
        c = nhwc[3]
        inv = np.argsort(np.arange(c).reshape(shuffle_groups, c // shuffle_groups).T.reshape(-1))
        y = v
        for op, attrs, const, const_first in reversed(ops):
            if op is _RELU:
                y = self.builder_.emit(relax.op.nn.relu(y))
            elif op is _CONV2D:
                y = self.builder_.emit(relax.op.nn.conv2d(
                    y, relax.const(np.ascontiguousarray(const[..., inv])), strides=attrs.strides,
                    padding=attrs.padding, dilation=attrs.dilation, groups=int(attrs.groups), data_layout="NHWC",
                    kernel_layout="HWIO", out_layout="NHWC", out_dtype=attrs.out_dtype))
            else:
                permuted = relax.const(np.ascontiguousarray(const[..., inv]) if const.size > 1 else const)
                y = self.builder_.emit(op(permuted, y) if const_first else op(y, permuted))
        flat = self.builder_.emit(relax.op.reshape(y, (grouped[0], c)))
        self.rewritten += 1
        return self.builder_.call_te(shuffled_group_matmul, flat, relax.const(weight), shuffle_groups,
                                     primfunc_name_hint="shuffled_matmul")

    def _per_channel_chain_to_shuffle(self, z: Any, channels: int) -> tuple[Any, int, list[tuple[Any, ...]]] | None:
        """(the shuffle's input, its groups, the ops from the shuffle to ``z``, outermost first) when ``z`` is
        computed from an NHWC channel shuffle by depthwise convolutions, per-channel constant ops and relus,
        each result used once; else None. An op: (op, attrs, constant or None, constant first)."""
        ops: list[tuple[Any, ...]] = []
        x = z
        while isinstance(x, relax.Var) and self.uses.get(x) == 1:
            call = bound_value(self, x)
            if not isinstance(call, relax.Call):
                return None
            shuffled = self._shuffle(call, channels)
            if shuffled is not None:
                return shuffled[0], shuffled[1], ops
            if call.op == _RELU:
                ops.append((_RELU, None, None, False))
                x = call.args[0]
            elif call.op == _CONV2D:
                weight = _constant(self, call.args[1])
                attrs = call.attrs
                if weight is None or int(attrs.groups) != channels or weight.shape[2:] != (1, channels) \
                        or attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC":
                    return None
                ops.append((_CONV2D, attrs, weight, False))
                x = call.args[0]
            elif call.op in _PER_CHANNEL:
                consts = [_constant(self, a) for a in call.args]
                side = next((i for i, v in enumerate(consts) if v is not None), None)
                if side is None:
                    return None
                value = consts[side]
                assert value is not None
                if value.size != 1 and (value.ndim != 4 or value.shape[:3] != (1, 1, 1) or value.shape[3] != channels):
                    return None
                ops.append((_PER_CHANNEL[call.op], None, value, side == 0))
                x = call.args[1 - side]
            else:
                return None
        return None

    def _shuffle(self, call: relax.Call, channels: int) -> tuple[Any, int] | None:
        """(input, groups) of ``reshape(permute_dims(reshape(v, (n, h, w, g, c/g)), [0, 1, 2, 4, 3]), (n, h, w, c))``."""
        if call.op != _RESHAPE or len(static_shape(call) or ()) != 4:
            return None
        swapped = self._bound_call(call.args[0], _PERMUTE)
        if swapped is None or [int(a) for a in swapped.attrs.axes or []] != [0, 1, 2, 4, 3]:
            return None
        split = self._bound_call(swapped.args[0], _RESHAPE)
        grouped = static_shape(split) if split is not None else None
        if split is None or grouped is None or len(grouped) != 5 or static_shape(split.args[0]) != static_shape(call) \
                or grouped[3] * grouped[4] != channels:
            return None
        return split.args[0], grouped[3]


@tvm.transform.module_pass(opt_level=0, name="KilnShuffleIntoGroupMatmul")
class ShuffleIntoGroupMatmul:
    """NHWC channel shuffle -> depthwise conv / per-channel ops -> grouped fp32 matmul: the shuffle read
    through the matmul's input index, the ops between with permuted constants."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if has_8bit_tensors(mod):
            return mod  # 8-bit shuffles move 8-bit values (ADR 0035); their units keep ADR 0041's kernels
        rewriter = _ShuffleIntoMatmul(mod)
        out = rewrite_functions(mod, rewriter)
        return relax.transform.DeadCodeElimination()(out) if rewriter.rewritten else out
