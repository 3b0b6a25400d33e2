"""Batch norms after ShuffleNet's grouped 1x1 and depthwise convolutions folded into their weights (fp32).

After ``DecomposeOpsForInference`` a batch norm is ``(y - mean) * rsqrt(var + eps) * gamma + beta``: four
per-channel passes that ``FoldConstant`` cannot combine (each has the non-constant ``y`` on one side). In a
kernel's write-back they cost four vector operations per output vector, which a convolution with a long
reduction hides and a short one does not: ShuffleNet's first grouped layer reduces over 6 input channels
(6 FMAs per accumulator against 4 epilogue operations and a relu), its depthwise 3x3 layers over 9 taps.
``FoldAffineIntoGroupWeights`` rewrites ``a(conv(x, w))``, ``a`` a chain of per-channel constant
subtracts, multiplies and adds, into ``conv(x, w * s) + b`` (``s``, ``b``: the chain as one scale and one
shift per output channel), for the grouped matmuls ``SplitGroupedConv`` writes
(``(pixels, groups, 1, in) x (groups, in, out)``, its constants per (group, channel)) and depthwise NHWC
convolutions. The one add left fuses into the kernel's write-back as the chain did.

fp32 models compiled in fp32 only (the pipeline passes it with ADR 0044's rewrites): bf16 keeps the batch
norm in fp32 after its bf16 products (ADR 0049 measured folding there), 8-bit models requantize.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import rewrite_functions, static_shape
from .affine import compose_affine
from .grouped_conv import has_8bit_tensors
from .shuffle import use_counts

_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_ADD = tvm.ir.Op.get("relax.add")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")


def _constant(expr: Any) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


@mutator
class _WeightFolder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.uses = use_counts(mod)
        self.bindings: dict[Any, Any] = {}
        self.consumer: dict[Any, list[Any]] = {}  # var -> the variables of the bindings that use it
        for _, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            for block in func.body.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        self.bindings[binding.var] = binding.value
                        for arg in getattr(binding.value, "args", []):
                            if isinstance(arg, relax.Var):
                                self.consumer.setdefault(arg, []).append(binding.var)
        self.absorbed: dict[Any, Any] = {}  # a chain op folded into its anchor -> the folded anchor's result
        self.folded = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.absorbed:  # its scale is in the anchor's weights, its shift in the one add
            self.set_var_remap(binding.var, self.absorbed[binding.var])
            return
        if isinstance(binding.value, relax.Call):
            folded = self._fold(binding.var, binding.value)
            if folded is not None:
                self.set_var_remap(binding.var, folded)
                return
        super().visit_var_binding_(binding)

    @staticmethod
    def _per_channel(c: np.ndarray, channels: tuple[int, ...]) -> np.ndarray | None:
        """``c`` (a scalar, or per channel: ``channels`` with leading ones) as an array of shape ``channels``."""
        if c.dtype != np.float32:
            return None
        if c.size == 1:
            return np.full(channels, c.reshape(()), dtype=np.float32)
        lead = c.ndim - len(channels)
        if lead < 0 or c.shape[lead:] != channels or any(d != 1 for d in c.shape[:lead]):
            return None
        return c.reshape(channels)

    def _anchor_weight(self, call: relax.Call) -> np.ndarray | None:
        """The constant weight of a grouped fp32 matmul or a depthwise NHWC conv, else None."""
        if str(getattr(call.ty, "dtype", "")) != "float32" or len(call.args) != 2:
            return None
        w = _constant(call.args[1])
        if w is None or w.dtype != np.float32:
            return None
        if call.op == _MATMUL:
            shape = static_shape(call)
            return w if w.ndim == 3 and shape is not None and len(shape) == 4 and shape[2] == 1 else None
        attrs = call.attrs
        if call.op != _CONV2D or attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" \
                or attrs.out_layout != "NHWC" or w.ndim != 4 or w.shape[2] != 1 or int(attrs.groups) != w.shape[3]:
            return None
        return w

    def _fold(self, var: Any, call: relax.Call) -> Any | None:
        """The folded anchor for ``var = call``, an anchor with an affine chain after it; marks the chain."""
        w = self._anchor_weight(call)
        out_shape = static_shape(call)
        if w is None or out_shape is None:
            return None
        # per channel: (groups, 1, out) for the matmul (its constants above the reshape), (out,) for the conv
        channels = out_shape[1:] if call.op == _MATMUL else out_shape[-1:]
        steps: list[tuple[Any, np.ndarray]] = []
        chain, x = [], var
        # a dataflow variable used once (an output variable is read after the block too)
        while isinstance(x, relax.DataflowVar) and self.uses.get(x) == 1 and len(self.consumer.get(x, [])) == 1:
            user = self.consumer[x][0]
            op = self.bindings.get(user)
            if not isinstance(op, relax.Call) or op.op not in (_ADD, _SUBTRACT, _MULTIPLY) or len(op.args) != 2:
                break
            consts = [_constant(a) for a in op.args]
            side = 1 if consts[1] is not None and op.args[0].same_as(x) else 0 if consts[0] is not None else None
            if side is None or not op.args[1 - side].same_as(x) or static_shape(op) != out_shape:
                break
            c = self._per_channel(consts[side], channels)  # type: ignore[arg-type]
            if c is None or (op.op == _SUBTRACT and side == 0):  # c - y flips the sign: not folded
                break
            steps.append((op.op, c))
            chain.append(user)
            x = user
        if not any(self.bindings[u].op == _MULTIPLY for u in chain):
            return None  # nothing to fold into the weights
        scale, shift = compose_affine(steps, channels)
        weight = w * scale  # (groups, in, out) x (groups, 1, out), or (kh, kw, 1, out) x (out,)
        args = [self.visit_expr(call.args[0]), relax.const(np.ascontiguousarray(weight, dtype=np.float32))]
        anchor = self.builder_.emit(relax.Call(call.op, args, call.attrs))
        shift_shape = out_shape[1:] if call.op == _MATMUL else (1, 1, 1, out_shape[-1])
        result = self.builder_.emit(relax.op.add(anchor, relax.const(shift.astype(np.float32).reshape(shift_shape))))
        for user in chain:  # each used only by the next: the last one's users read the folded result
            self.absorbed[user] = result
        self.folded += 1
        return result


@tvm.transform.module_pass(opt_level=0, name="KilnFoldAffineIntoGroupWeights")
class FoldAffineIntoGroupWeights:
    """Per-channel scale/shift chains (batch norms) after fp32 grouped matmuls and depthwise convs folded into
    their weights and one add."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if has_8bit_tensors(mod):
            return mod
        rewriter = _WeightFolder(mod)
        out = rewrite_functions(mod, rewriter)
        return relax.transform.DeadCodeElimination()(out) if rewriter.folded else out
