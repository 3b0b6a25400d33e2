"""Constant folding in numpy, ahead of Relax's FoldConstant, for the operators numpy computes bit for bit.

Relax's ``FoldConstant`` evaluates every operator whose arguments are all constants by legalizing it
to a PrimFunc, building that PrimFunc with LLVM and calling it: 20-50 ms of LLVM per call, and a
model with batch norms folds hundreds of them (DenseNet-121: the weight transposes of ConvertLayout and
every batch norm's ``gamma / sqrt(var + eps)``, ``beta - mean * scale``). ``PrefoldConstants`` folds
the same calls first, with numpy, where the result cannot differ from the LLVM build's:

* data movement (``permute_dims``, ``reshape``, ``expand_dims``, ``squeeze``, ``flatten``): a copy;
* float32 ``add``, ``subtract``, ``multiply``, ``divide``, ``sqrt`` with numpy broadcasting (Relax's):
  IEEE-754 correctly rounded in both (TVM folds for the generic ``llvm`` target, built without
  fast-math, and one operator per PrimFunc, so there is no FMA contraction to differ from).

Like ``FoldConstant`` it folds only inside dataflow blocks and only calls whose arguments are all
constants; what it leaves (other operators, other dtypes, ``call_tir``) ``FoldConstant`` still folds.
The module that comes out of ``FoldConstant`` is the same as without this pass (tests compare them
structurally, constants included), it just costs no LLVM build per folded call (ADR 0040).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, static_shape

_RESHAPES = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("reshape", "expand_dims", "squeeze", "flatten"))
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
_ARITHMETIC = {tvm.ir.Op.get(f"relax.{name}"): fn for name, fn in
               (("add", np.add), ("subtract", np.subtract), ("multiply", np.multiply), ("divide", np.divide))}
_SQRT = tvm.ir.Op.get("relax.sqrt")


def _dtype(expr: Any) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def fold_call(call: relax.Call, args: list[np.ndarray]) -> np.ndarray | None:
    """``call`` evaluated on the constant ``args`` when numpy gives exactly TVM's bits, else None."""
    out_shape, out_dtype = static_shape(call), _dtype(call)
    if out_shape is None or out_dtype is None:
        return None
    if call.op in _RESHAPES and len(args) >= 1 and str(args[0].dtype) == out_dtype:
        if int(np.prod(out_shape)) != args[0].size:
            return None
        return np.ascontiguousarray(args[0].reshape(out_shape))
    if call.op == _PERMUTE_DIMS and len(args) == 1 and str(args[0].dtype) == out_dtype:
        axes = call.attrs.axes
        value = np.transpose(args[0], None if axes is None else [int(a) for a in axes])
        return np.ascontiguousarray(value) if value.shape == out_shape else None
    if out_dtype != "float32" or any(a.dtype != np.float32 for a in args):
        return None
    with np.errstate(all="ignore"):  # inf/nan as LLVM would produce them
        if call.op in _ARITHMETIC and len(args) == 2:
            value = _ARITHMETIC[call.op](args[0], args[1])
        elif call.op == _SQRT and len(args) == 1:
            value = np.sqrt(args[0])
        else:
            return None
    value = np.ascontiguousarray(value, dtype=np.float32)
    return value if value.shape == out_shape else None


@mutator
class _Prefold(PyExprMutator):
    def __init__(self, mod: tvm.IRModule | None = None) -> None:
        super().__init__(mod)
        self.in_dataflow = False
        self.folded = 0

    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> Any:
        outer, self.in_dataflow = self.in_dataflow, True
        try:
            return super().visit_dataflow_block_(block)
        finally:
            self.in_dataflow = outer

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if not self.in_dataflow or not isinstance(call.op, tvm.ir.Op):
            return call
        if not (call.op in _RESHAPES or call.op == _PERMUTE_DIMS or call.op in _ARITHMETIC or call.op == _SQRT):
            return call
        data = [bound_value(self, a) for a in call.args[:1 if call.op in _RESHAPES else len(call.args)]]
        if not data or not all(isinstance(a, tvm.ir.expr.Constant) for a in data):
            return call
        value = fold_call(call, [a.value.numpy() for a in data])
        if value is None:
            return call
        self.folded += 1
        return relax.const(value, str(value.dtype))


@tvm.transform.module_pass(opt_level=0, name="KilnPrefoldConstants")
class PrefoldConstants:
    """Fold all-constant data movement and float32 arithmetic with numpy before ``FoldConstant`` (ADR 0040)."""

    def __init__(self) -> None:
        self.folded = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Prefold(mod)
        result = rewrite_functions(mod, rewriter)
        self.folded += rewriter.folded
        return result
