"""``FoldChannelAffine``: a chain of per-channel subtracts, multiplies and adds as one multiply and one add.

A batch norm reaches the CPU graph decomposed, ``((x - mean) * rsqrt(var + eps)) * gamma + beta``, and
DenseNet's light model follows each with a ``Mul`` and an ``Add`` by per-channel constants: six vector
operations per output vector, in the epilogue of every 1x1 convolution and in every concatenation +
pre-activation kernel (57 of them, memory passes over all features so far). Composed at compile time
(in float64) the chain is ``x * scale + shift``. The result moves by fp32 rounding only (a few ulp);
it runs in fp32 and bf16 builds (ADR 0053). Unlike ADR 0049's rejected rule nothing is folded into a
convolution's weights, so no weight is rounded differently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import rewrite_functions, static_shape

_ADD = tvm.ir.Op.get("relax.add")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")


def _channel_vector(expr: Any, channels: int) -> np.ndarray | None:
    """``expr`` as a float64 vector over the innermost (channel) axis (length 1 for a scalar): a float32
    constant that is a scalar or varies along that axis only; None otherwise."""
    if not isinstance(expr, tvm.ir.expr.Constant) or str(expr.value.dtype) != "float32":
        return None
    value = expr.value.numpy()
    if any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in (1, channels)):
        return None
    return value.reshape(-1).astype("float64")  # one value (a scalar) or one per channel


def compose_affine(steps: list[tuple[Any, np.ndarray]], channels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float64 of shape ``channels``, with ``x * scale + shift`` equal to ``steps`` applied to
    ``x`` in order, each step ``(op, c)``: ``x + c``, ``x - c`` or ``x * c`` (``c`` broadcast to ``channels``)."""
    scale, shift = np.ones(channels), np.zeros(channels)
    for op, c in steps:
        if op == _MULTIPLY:
            scale, shift = scale * c, shift * c
        else:
            shift = shift + c if op == _ADD else shift - c
    return scale, shift


@mutator
class _ChainFolder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.bases: set[Any] = set()  # one per folded chain (its steps all walk back to it)
        self._values: dict[Any, Any] = {}  # the input functions' variables -> their bound values
        self._uses: dict[Any, int] = {}
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self._values.update(relax.analysis.get_var2val(func))
                for block in getattr(func.body, "blocks", []):
                    if isinstance(block, relax.DataflowBlock):
                        for var, users in relax.analysis.udchain(block).items():
                            self._uses[var] = len(users)

    def _step(self, node: Any) -> tuple[Any, Any, np.ndarray] | None:
        """(op, data variable, channel vector) of ``data op constant`` on a float32 NHWC-like tensor."""
        if not isinstance(node, relax.Call) or node.op not in (_ADD, _SUBTRACT, _MULTIPLY) or len(node.args) != 2:
            return None
        data, const = node.args
        if node.op != _SUBTRACT and not isinstance(data, relax.Var):
            data, const = const, data
        shape = static_shape(node)
        if not isinstance(data, relax.Var) or not shape or static_shape(data) != shape \
                or str(node.ty.dtype) != "float32":
            return None
        vector = _channel_vector(const, shape[-1])
        return None if vector is None else (node.op, data, vector)

    def _chain(self, call: relax.Call) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """(base, scale, shift) with ``call == base * scale + shift``, walking back through per-channel steps
        whose results have no other reader; None unless at least two steps fold into the two."""
        steps: list[tuple[Any, np.ndarray]] = []
        node: Any = call
        while (step := self._step(node)) is not None:
            op, data, vector = step
            steps.append((op, vector))
            if self._uses.get(data, 0) != 1 or self._step(self._values.get(data)) is None:
                break
            node = self._values[data]
        if len(steps) < 3:  # x * s + b already is two operations
            return None
        channels = max(len(vector) for _, vector in steps)  # 1: all scalars, kept scalar
        scale, shift = compose_affine(steps[::-1], channels)  # collected walking back: applied first last
        return data, scale, shift

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        chain = self._chain(call)
        new = super().visit_call_(call)
        if chain is None:
            return new
        base, scale, shift = chain
        self.bases.add(base)  # the chain's earlier steps, folded too where they were visited, are left unused
        const_shape = (1,) * (len(static_shape(call)) - 1) + (-1,)  # type: ignore[arg-type]
        scaled = relax.op.multiply(self.visit_expr(base), relax.const(scale.astype("float32").reshape(const_shape)))
        return relax.op.add(scaled, relax.const(shift.astype("float32").reshape(const_shape)))


@tvm.transform.module_pass(opt_level=0, name="KilnFoldChannelAffine")
class FoldChannelAffine:
    """Chains of three or more per-channel subtract/multiply/add by constants -> ``x * scale + shift``."""

    def __init__(self) -> None:
        self.folded = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        folder = _ChainFolder(mod)
        out = rewrite_functions(mod, folder)
        self.folded = len(folder.bases)
        return relax.transform.DeadCodeElimination()(out)
