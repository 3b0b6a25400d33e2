"""Running a PyExprMutator over every Relax function of a module (shared by the rewrites)."""

from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi
from tvm import relax


def rewrite_functions(mod: tvm.IRModule, mutator: Any) -> tvm.IRModule:
    """Apply ``mutator`` (a ``PyExprMutator`` built on ``mod``) to each Relax function of ``mod``."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    result: tvm.IRModule = mutator.builder_.get()
    return result


def same_shape(a: Any, b: Any) -> bool:
    """Whether two Relax expressions are tensors of the same static shape and dtype."""
    sa, sb = getattr(a, "ty", None), getattr(b, "ty", None)
    if not isinstance(sa, relax.TensorType) or not isinstance(sb, relax.TensorType):
        return False
    if sa.shape is None or sb.shape is None or sa.dtype != sb.dtype:
        return False
    return bool(tvm_ffi.structural_equal(sa.shape, sb.shape))


def static_shape(expr: Any) -> tuple[int, ...] | None:
    """The shape of a tensor expression when every dimension is a constant, else None."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def bound_value(mutator: Any, expr: Any) -> Any:
    """What a variable is bound to in the function being rewritten (the expression itself otherwise)."""
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if bound is not None:
            return bound
    return expr
