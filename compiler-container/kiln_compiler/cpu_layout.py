"""Graph-level rewrites that put CPU convolutions in a vector-friendly layout.

* ``SimplifySum``: ONNX ``Sum`` arrives as ``sum(stack([broadcast_to(a), broadcast_to(b)]), 0)``
  (a 5-D copy of both operands); it becomes ``a + b``, which fuses into the producer's epilogue.
* ``to_nhwc``: convolutions run in NHWC with HWIO weights, so the output channels are the
  innermost, contiguous axis: the default schedule then vectorises over output channels
  (full vectors for every layer width, no strided gathers) and unrolls over output pixels,
  each input value being one broadcast reused by a whole vector of channels. Relax's
  ConvertLayout carries the layout through layout-agnostic operators (elementwise, pooling,
  concat, batch norm) and transposes only at the edges (graph input, reshape, flatten).
"""

from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def _same_shape(a: Any, b: Any) -> bool:
    sa, sb = getattr(a, "ty", None), getattr(b, "ty", None)
    if not isinstance(sa, relax.TensorType) or not isinstance(sb, relax.TensorType):
        return False
    if sa.shape is None or sb.shape is None or sa.dtype != sb.dtype:
        return False
    return bool(tvm_ffi.structural_equal(sa.shape, sb.shape))


@mutator
class _SumRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)

    def _strip_broadcast(self, expr: Any, like: Any) -> Any:
        """``broadcast_to(x, s)`` where x already has shape s is x."""
        seen = expr
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None:
                seen = bound
        if (isinstance(seen, relax.Call) and seen.op == tvm.ir.Op.get("relax.broadcast_to")
                and _same_shape(seen.args[0], like)):
            return seen.args[0]
        return expr

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> Any:
        op = super().visit_tuple_getitem_(op)
        src = op.tuple_value
        bound = self.lookup_binding(src) if isinstance(src, relax.Var) else src
        if (op.index == 0 and isinstance(bound, relax.Call)
                and bound.op == tvm.ir.Op.get("relax.nn.dropout")):
            return bound.args[0]  # inference: dropout is the identity
        return op

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.sum") or call.attrs.keepdims:
            return call
        axis = call.attrs.axis
        if axis is None or len(axis) != 1:
            return call
        src = call.args[0]
        stack = self.lookup_binding(src) if isinstance(src, relax.Var) else src
        if not isinstance(stack, relax.Call) or stack.op != tvm.ir.Op.get("relax.stack"):
            return call
        if int(stack.attrs.axis) != int(axis[0]) or int(axis[0]) != 0:
            return call
        items = stack.args[0]
        if isinstance(items, relax.Var):
            items = self.lookup_binding(items)
        if not isinstance(items, relax.Tuple) or len(items.fields) < 1:
            return call
        fields = [self._strip_broadcast(f, call) for f in items.fields]
        if not all(_same_shape(f, call) for f in fields):
            return call
        acc = fields[0]
        for f in fields[1:]:
            acc = self.builder_.emit(relax.op.add(acc, f))
        return acc


@tvm.transform.module_pass(opt_level=0, name="KilnSimplifySum")
class SimplifySum:
    """``sum(stack([a, b, ...]), axis=0)`` -> ``a + b + ...``; inference dropout -> its input.

    (Dropout's ``(out, mask)`` tuple also defeats ConvertLayout.)"""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _SumRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()


def to_nhwc() -> list[tvm.transform.Pass]:
    """Passes that convert conv2d (and what follows it) to NHWC / HWIO."""
    return [
        relax.transform.DecomposeOpsForInference(),
        SimplifySum(),
        relax.transform.CanonicalizeBindings(),  # ConvertLayout loses the layout across aliases
        relax.transform.FoldConstant(),  # bias reshapes: ConvertLayout trips over shape tuples
        relax.transform.DeadCodeElimination(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        relax.transform.Normalize(),
        relax.transform.EliminateCommonSubexpr(),  # one input transpose per graph input
    ]
