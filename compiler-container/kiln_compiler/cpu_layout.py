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

import numpy as np
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


_DIVIDE = tvm.ir.Op.get("relax.divide")
_BINARY_EWISE = tuple(tvm.ir.Op.get(f"relax.{name}") for name in
                      ("add", "subtract", "multiply", "divide", "maximum", "minimum", "power"))


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

    def _full_rank_constants(self, call: relax.Call) -> Any:
        """``x * c`` with a lower-rank constant ``c`` (ONNX ``Unsqueeze(scale, [1, 2])`` of shape
        (C, 1, 1)) gets ``c`` reshaped to x's rank: ConvertLayout keeps a binary op with operands of
        different ranks in NCHW, which put two transposes around every DenseNet batch norm."""
        out = getattr(call, "ty", None)
        if not isinstance(out, relax.TensorType) or out.ndim < 1:
            return call
        args = list(call.args)
        changed = False
        for i, arg in enumerate(args):
            value = arg.value.numpy() if isinstance(arg, tvm.ir.expr.Constant) else None
            if value is not None and 0 < value.ndim < out.ndim:
                args[i] = relax.const(value.reshape((1,) * (out.ndim - value.ndim) + value.shape), str(value.dtype))
                changed = True
        if call.op == _DIVIDE and isinstance(args[1], tvm.ir.expr.Constant):
            # x / c -> x * (1/c): a vector divide costs ~10 multiplies (batch norm's 1/sqrt(var))
            value = args[1].value.numpy()
            if value.dtype.kind == "f" and np.all(value != 0):
                return relax.op.multiply(args[0], relax.const((1.0 / value).astype(value.dtype)))
        if not changed:
            return call
        return relax.Call(call.op, args, call.attrs)

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
        if call.op in _BINARY_EWISE:
            return self._full_rank_constants(call)
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
    """``sum(stack([a, b, ...]), axis=0)`` -> ``a + b + ...``; inference dropout -> its input;
    lower-rank constant operands of binary ops reshaped to full rank; division by a constant
    becomes multiplication by its reciprocal.

    (Dropout's ``(out, mask)`` tuple also defeats ConvertLayout.)"""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _SumRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()


_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


@mutator
class _GroupSplitter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, max_groups: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.max_groups = max_groups

    def _constant(self, expr: Any) -> Any:
        seen = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        return seen.value.numpy() if isinstance(seen, tvm.ir.expr.Constant) else None

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op != _CONV2D:
            return call
        attrs = call.attrs
        groups = int(attrs.groups)
        if (groups < 1 or groups > self.max_groups or attrs.data_layout != "NHWC"
                or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"):
            return call
        weight = self._constant(call.args[1])
        if weight is None or weight.ndim != 4:
            return call
        kh, kw, cg_in, k = weight.shape
        if groups == 1:
            return self._pad_channels(call, weight)
        if cg_in == 1 or k % groups:  # depthwise keeps its own kernel
            return call
        cg_out = k // groups
        padded = -(-cg_out // self.lanes) * self.lanes
        data = call.args[0]
        parts = []
        for g in range(groups):
            x = self.builder_.emit(relax.op.strided_slice(data, axes=[3], begin=[g * cg_in], end=[(g + 1) * cg_in]))
            w = np.zeros((kh, kw, cg_in, padded), dtype=weight.dtype)
            w[..., :cg_out] = weight[..., g * cg_out:(g + 1) * cg_out]
            y = self.builder_.emit(relax.op.nn.conv2d(
                x, relax.const(w), strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                groups=1, data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC", out_dtype=attrs.out_dtype))
            if padded != cg_out:
                y = self.builder_.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[cg_out]))
            parts.append(y)
        return relax.op.concat(parts, axis=3)

    def _pad_channels(self, call: relax.Call, weight: Any) -> Any:
        """Output channels padded to whole vectors when that wastes at most a fifth of the work
        (SqueezeNet's 1000-class 1x1 layer ran on half vectors, 8 of 1000's factors)."""
        k = weight.shape[3]
        if k % self.lanes == 0 or k < self.lanes:
            return call
        padded = -(-k // (2 * self.lanes)) * 2 * self.lanes  # two vectors: the widest tile
        if (padded - k) * 8 > k:
            padded = -(-k // self.lanes) * self.lanes
        if (padded - k) * 5 > k:
            return call
        w = np.zeros((*weight.shape[:3], padded), dtype=weight.dtype)
        w[..., :k] = weight
        attrs = call.attrs
        y = self.builder_.emit(relax.op.nn.conv2d(
            call.args[0], relax.const(w), strides=attrs.strides, padding=attrs.padding,
            dilation=attrs.dilation, groups=1, data_layout="NHWC", kernel_layout="HWIO",
            out_layout="NHWC", out_dtype=attrs.out_dtype))
        return relax.op.strided_slice(y, axes=[3], begin=[0], end=[k])


@tvm.transform.module_pass(opt_level=0, name="KilnSplitGroupedConv")
class SplitGroupedConv:
    """A grouped NHWC convolution with a few groups (ShuffleNet: 4 groups of 68 channels) becomes
    one dense convolution per group, output channels zero-padded to whole vectors, then a concat;
    a dense one whose channel count is not a multiple of the vector is padded the same way.

    Vectorised over output channels, a grouped convolution's vector spans two groups whenever the
    group width is not a multiple of the vector, and its input reads become gathers: ShuffleNet's
    grouped 1x1 layers ran at 6 GFLOP/s. Depthwise convolutions (one input channel per group)
    and convolutions with more than ``max_groups`` groups are left as they are.
    """

    def __init__(self, lanes: int, max_groups: int = 8) -> None:
        self.lanes = lanes
        self.max_groups = max_groups

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _GroupSplitter(mod, self.lanes, self.max_groups)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()


def to_nhwc(lanes: int = 16) -> list[tvm.transform.Pass]:
    """Passes that convert conv2d (and what follows it) to NHWC / HWIO; ``lanes``: fp32 vector width."""
    return [
        relax.transform.DecomposeOpsForInference(),
        SimplifySum(),
        relax.transform.CanonicalizeBindings(),  # ConvertLayout loses the layout across aliases
        relax.transform.FoldConstant(),  # bias reshapes: ConvertLayout trips over shape tuples
        relax.transform.DeadCodeElimination(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        relax.transform.Normalize(),
        relax.transform.FoldConstant(),  # HWIO weights as constants for SplitGroupedConv
        SimplifySum(),  # again, now that batch norm's 1/sqrt(var + eps) is a constant
        SplitGroupedConv(lanes),
        relax.transform.EliminateCommonSubexpr(),  # one input transpose per graph input
    ]
