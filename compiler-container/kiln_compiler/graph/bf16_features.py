"""``FeaturesInBF16``: bf16 convolutions whose results are only concatenated (DenseNet's features) write bf16.

Every DenseNet-121 layer concatenates the features of all layers before it in its block and normalises
the whole concatenation with its own batch norm (ADR 0034: one fused concat + pre-activation kernel per
layer, reading each feature map once). Those kernels read 42 MB of fp32 per inference: each 3x3
convolution's 32 channels are read again by every later layer of the block. Stored in bf16 (the
convolution's epilogue rounds once, as OpenVINO's bf16 graph stores them) each reader moves half the bytes
and widens in registers; the features are then rounded before the batch norm instead of after it, one
more bf16 rounding per layer input, which is why this is a bf16-only rewrite (ADR 0053).

After ``ConvToBF16``: a conv2d with bf16 data and an fp32 result read by two or more concatenations and
per-channel elementwise ops (at least one concatenation) gets one cast to bf16; each reader reads its own widening
cast, which FuseOps puts in that reader's kernel (a shared one would fuse back into the convolution).
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import rewrite_functions

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_CONCAT = tvm.ir.Op.get("relax.concat")
_ELEMENTWISE = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("add", "subtract", "multiply", "nn.relu"))


def _dtype(expr: Any) -> str:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


def _bf16_conv(value: Any) -> bool:
    return (isinstance(value, relax.Call) and value.op == _CONV2D and _dtype(value.args[0]) == "bfloat16"
            and _dtype(value) == "float32")


@mutator
class _Narrower(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.narrowed: set[Any] = set()  # the fp32 convolution results now written in bf16
        self._narrow: dict[Any, relax.Var] = {}  # such a result -> its bf16 cast (emitted at the first reader)
        for _, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            values = relax.analysis.get_var2val(func)
            for block in getattr(func.body, "blocks", []):
                if not isinstance(block, relax.DataflowBlock):
                    continue
                for var, users in relax.analysis.udchain(block).items():
                    readers = [values.get(u) for u in users]
                    # one reader: FuseOps would put both casts in the convolution, which then writes fp32
                    if _bf16_conv(values.get(var)) and len(readers) > 1 and \
                            all(isinstance(r, relax.Call) and r.op in (_CONCAT, *_ELEMENTWISE) for r in readers) and \
                            any(r.op == _CONCAT for r in readers):  # type: ignore[union-attr]
                        self.narrowed.add(var)

    def _widened(self, expr: Any) -> Any:
        if expr not in self.narrowed:
            return expr
        if expr not in self._narrow:
            self._narrow[expr] = self.builder_.emit(relax.op.astype(expr, "bfloat16"))
        return self.builder_.emit(relax.op.astype(self._narrow[expr], "float32"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == _CONCAT and isinstance(call.args[0], relax.Tuple) \
                and any(f in self.narrowed for f in call.args[0].fields):
            fields = [self._widened(f) for f in call.args[0].fields]
            return relax.op.concat(relax.Tuple(fields), axis=int(call.attrs.axis))
        if call.op in _ELEMENTWISE and any(a in self.narrowed for a in call.args):
            return relax.Call(call.op, [self._widened(a) for a in call.args], call.attrs)
        return call


@tvm.transform.module_pass(opt_level=0, name="KilnFeaturesInBF16")
class FeaturesInBF16:
    """bf16 convolutions read only by concatenations (and elementwise ops) write bf16; readers widen."""

    def __init__(self) -> None:
        self.narrowed = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Narrower(mod)
        out = rewrite_functions(mod, rewriter)
        self.narrowed = len(rewriter.narrowed)
        return out
