"""Small Relax rewrites that let ConvertLayout keep NHWC and let epilogues fuse.

Each rewrite is its own named pass:

* ``SumOfStackToAdd``: ONNX ``Sum`` arrives as ``sum(stack([broadcast_to(a), broadcast_to(b)]), 0)``
  (a 5-D copy of both operands); it becomes ``a + b``, which fuses into the producer's epilogue.
* ``RemoveInferenceDropout``: dropout's ``(out, mask)`` tuple is the identity at inference, and
  the tuple defeats ConvertLayout.
* ``ConstantsToFullRank``: ``x * c`` with a lower-rank constant ``c`` (ONNX ``Unsqueeze(scale,
  [1, 2])`` of shape (C, 1, 1)) gets ``c`` reshaped to x's rank: ConvertLayout keeps a binary op
  with operands of different ranks in NCHW (two transposes around every DenseNet batch norm).
* ``DivideByConstantToMultiply``: ``x / c`` becomes ``x * (1/c)``: a vector divide costs ~10
  multiplies (batch norm's ``1/sqrt(var + eps)``).
* ``PowerToRoots``: ``x ** c`` for ``c`` in 1/4, 1/2, 3/4 becomes square roots (``x ** 0.75 =
  sqrt(x) * sqrt(sqrt(x))``): ``power`` lowers to a scalar ``powf`` call per element, a square
  root to one vector instruction. Local response normalisation (Inception-v1) raises its whole
  feature map to 0.75: 2.8 ms of a 22 ms inference at 55x55x192 (ADR 0036).
* ``ChannelWindowToSlices``: local response normalisation's sum of squares over a window of
  channels arrives as ``squeeze(avg_pool3d(expand_dims(x, 1)))`` pooling the channel axis (last
  in NHWC); it becomes the sum of ``k`` shifted slices of the channel-padded ``x``, divided by
  ``k`` (the pool counts its padding): elementwise, so it fuses with the square before and the
  normalisation after into one pass, where the pool kernel ran at 7 GFLOP/s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, same_shape

_DIVIDE = tvm.ir.Op.get("relax.divide")
_POWER = tvm.ir.Op.get("relax.power")
_SQUEEZE = tvm.ir.Op.get("relax.squeeze")
_EXPAND_DIMS = tvm.ir.Op.get("relax.expand_dims")
_AVG_POOL3D = tvm.ir.Op.get("relax.nn.avg_pool3d")
_BINARY_EWISE = tuple(tvm.ir.Op.get(f"relax.{name}") for name in
                      ("add", "subtract", "multiply", "divide", "maximum", "minimum", "power"))


@mutator
class _SumOfStack(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.sum") or call.attrs.keepdims:
            return call
        axis = call.attrs.axis
        if axis is None or len(axis) != 1 or int(axis[0]) != 0:
            return call
        stack = bound_value(self, call.args[0])
        if not isinstance(stack, relax.Call) or stack.op != tvm.ir.Op.get("relax.stack"):
            return call
        if int(stack.attrs.axis) != 0:
            return call
        items = bound_value(self, stack.args[0])
        if not isinstance(items, relax.Tuple) or len(items.fields) < 1:
            return call
        fields = [self._strip_broadcast(f, call) for f in items.fields]
        if not all(same_shape(f, call) for f in fields):
            return call
        acc = fields[0]
        for f in fields[1:]:
            acc = self.builder_.emit(relax.op.add(acc, f))
        return acc

    def _strip_broadcast(self, expr: Any, like: Any) -> Any:
        """``broadcast_to(x, s)`` where x already has shape s is x."""
        seen = bound_value(self, expr)
        if (isinstance(seen, relax.Call) and seen.op == tvm.ir.Op.get("relax.broadcast_to")
                and same_shape(seen.args[0], like)):
            return seen.args[0]
        return expr


@mutator
class _InferenceDropout(PyExprMutator):
    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> Any:
        op = super().visit_tuple_getitem_(op)
        bound = bound_value(self, op.tuple_value)
        if op.index == 0 and isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.nn.dropout"):
            return bound.args[0]
        return op


@mutator
class _FullRankConstants(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        out = getattr(call, "ty", None)
        if call.op not in _BINARY_EWISE or not isinstance(out, relax.TensorType) or out.ndim < 1:
            return call
        args = list(call.args)
        changed = False
        for i, arg in enumerate(args):
            value = arg.value.numpy() if isinstance(arg, tvm.ir.expr.Constant) else None
            if value is not None and 0 < value.ndim < out.ndim:
                args[i] = relax.const(value.reshape((1,) * (out.ndim - value.ndim) + value.shape), str(value.dtype))
                changed = True
        return relax.Call(call.op, args, call.attrs) if changed else call


@mutator
class _DivideByConstant(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != _DIVIDE or not isinstance(call.args[1], tvm.ir.expr.Constant):
            return call
        value = call.args[1].value.numpy()
        if value.dtype.kind != "f" or not np.all(value != 0):
            return call
        return relax.op.multiply(call.args[0], relax.const((1.0 / value).astype(value.dtype)))


@mutator
class _PowerToRoots(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != _POWER or not isinstance(call.args[1], tvm.ir.expr.Constant):
            return call
        value = call.args[1].value.numpy()
        if value.dtype.kind != "f" or value.size == 0 or not np.all(value == value.flat[0]) \
                or not same_shape(call.args[0], call):  # the exponent must not broadcast x
            return call
        exponent = float(value.flat[0])
        if exponent not in (0.25, 0.5, 0.75):
            return call
        root = self.builder_.emit(relax.op.sqrt(call.args[0]))
        if exponent == 0.5:
            return root
        fourth = self.builder_.emit(relax.op.sqrt(root))
        return fourth if exponent == 0.25 else relax.op.multiply(root, fourth)


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values] if values is not None else []


@mutator
class _ChannelWindow(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != _SQUEEZE or _ints(call.attrs.axis) != [1]:
            return call
        pool = bound_value(self, call.args[0])
        if not isinstance(pool, relax.Call) or pool.op != _AVG_POOL3D:
            return call
        expand = bound_value(self, pool.args[0])
        if not isinstance(expand, relax.Call) or expand.op != _EXPAND_DIMS or _ints(expand.attrs.axis) != [1]:
            return call
        a = pool.attrs
        k, pad = _ints(a.pool_size), _ints(a.padding)
        # a window of k channels, the channel axis last ("NCHWD": D is x's NHWC channel axis)
        if (str(a.layout) != "NCHWD" or str(a.out_layout) != "NCHWD" or len(k) != 3 or k[1:] != [1, 1]
                or _ints(a.strides) != [1, 1, 1] or _ints(a.dilation) != [1, 1, 1] or not a.count_include_pad
                or bool(a.ceil_mode) or pad != [(k[0] - 1) // 2, 0, 0, k[0] // 2, 0, 0]):
            return call
        x = expand.args[0]
        ty = getattr(x, "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.shape is None or not same_shape(x, call):
            return call
        channels = int(ty.shape.values[3])
        padded = self.builder_.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, 0, pad[0], pad[3]]))
        total: Any = None
        for i in range(k[0]):  # the pool's order of summation
            part = self.builder_.emit(relax.op.strided_slice(padded, axes=[3], begin=[i], end=[i + channels]))
            total = part if total is None else self.builder_.emit(relax.op.add(total, part))
        return relax.op.multiply(total, relax.const(1.0 / k[0], str(ty.dtype)))


def _rewrite_pass(rewriter: type[PyExprMutator], name: str, doc: str) -> Any:
    """A module pass class (instantiate it to get the pass) that runs ``rewriter`` over every function."""

    class _Pass:
        def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            return rewrite_functions(mod, rewriter(mod))

    _Pass.__doc__ = doc
    return tvm.transform.module_pass(opt_level=0, name=name)(_Pass)


SumOfStackToAdd = _rewrite_pass(
    _SumOfStack, "KilnSumOfStackToAdd",
    "``sum(stack([a, b, ...]), axis=0)`` -> ``a + b + ...`` (broadcasts to the same shape dropped).")
RemoveInferenceDropout = _rewrite_pass(_InferenceDropout, "KilnRemoveInferenceDropout", "``dropout(x)[0]`` -> ``x``.")
ConstantsToFullRank = _rewrite_pass(
    _FullRankConstants, "KilnConstantsToFullRank",
    "Lower-rank constant operands of binary elementwise ops reshaped to the result's rank.")
DivideByConstantToMultiply = _rewrite_pass(
    _DivideByConstant, "KilnDivideByConstantToMultiply",
    "``x / c`` -> ``x * (1/c)`` for a floating-point constant ``c`` with no zeros.")
PowerToRoots = _rewrite_pass(
    _PowerToRoots, "KilnPowerToRoots",
    "``x ** c`` -> square roots for a constant exponent of 1/4, 1/2 or 3/4 (``x ** 0.75 = sqrt(x) * sqrt(sqrt(x))``).")
ChannelWindowToSlices = _rewrite_pass(
    _ChannelWindow, "KilnChannelWindowToSlices",
    "``squeeze(avg_pool3d(expand_dims(x, 1)))`` over a window of NHWC channels -> a sum of shifted slices / k.")
