"""8-bit activations through max pools, concats, reshapes and transposes of QDQ graphs (ADR 0035).

onnxruntime's ``quantize_static`` wraps every max pool, concat, reshape and transpose (ShuffleNet's
channel shuffle) in its own QDQ pair:

    y_q = quantize(max_pool2d(dequantize(x_q, s, z)), s', z')
    y_q = quantize(concat(dequantize(a_q, s_a, z_a), dequantize(b_q, s_b, z_b)), s', z')

Lowered as written, the producing convolution writes its output dequantized to float32 (4 bytes a
value), the pool or concat reads and moves float32 and quantizes again. Both commute with the
quantization, exactly:

* a max pool with a positive scale: dequantize and quantize are monotonic, so the maximum of the
  8-bit values maps to the maximum of the real ones; with ``(s', z') = (s, z)`` (how quantize_static
  writes a max pool) ``quantize(dequantize(.))`` is the identity and the pool runs on ``x_q``
  itself. Padding: TOPI pads a pool with its dtype's minimum, below or equal to every real value.
* a reshape or transpose only moves values: it runs on ``x_q``, and ``x_q`` is requantized after it
  when the parameters differ (quantize_static writes them equal);
* a concat only moves values: each input is requantized to the output's parameters on its own,
  ``quantize(dequantize(a_q, s_a, z_a), s', z')`` (the same per-element arithmetic, the same double
  rounding as ONNX Runtime), nothing when its parameters are the output's. The requantization of
  an input fuses into the epilogue of the convolution that produces it; the concat moves bytes.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions

_QUANTIZE = tvm.ir.Op.get("relax.quantize")
_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
_MAX_POOL2D = tvm.ir.Op.get("relax.nn.max_pool2d")
_CONCAT = tvm.ir.Op.get("relax.concat")
# operators that only move values (first argument the tensor, the rest shapes or attributes)
_MOVES = {tvm.ir.Op.get("relax.reshape"), tvm.ir.Op.get("relax.permute_dims")}
_EIGHT_BIT = ("uint8", "int8")


def _scalar(expr: Any) -> float | None:
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value.numpy()
    return float(value.reshape(())) if value.size == 1 else None


def _dtype(expr: Any) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


@mutator
class _EightBitDataMovement(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def _per_tensor(self, call: Any, op: Any) -> tuple[Any, float, float] | None:
        """(operand, scale, zero point) of a per-tensor ``op`` (quantize or dequantize) call."""
        if not isinstance(call, relax.Call) or call.op != op:
            return None
        scale, zero_point = _scalar(call.args[1]), _scalar(call.args[2])
        if scale is None or zero_point is None or not scale > 0:
            return None
        return call.args[0], scale, zero_point

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        out = self._per_tensor(call, _QUANTIZE)
        if out is None or str(call.attrs.out_dtype) not in _EIGHT_BIT:
            return call
        src = bound_value(self, out[0])
        if isinstance(src, relax.Call) and src.op == _MAX_POOL2D:
            new = self._max_pool(call, src)
        elif isinstance(src, relax.Call) and src.op == _CONCAT:
            new = self._concat(call, src)
        elif isinstance(src, relax.Call) and src.op in _MOVES:
            new = self._move(call, src)
        else:
            new = None
        if new is None:
            return call
        self.rewritten += 1
        return new

    def _dequantized(self, expr: Any) -> relax.Call | None:
        """The per-tensor dequantize of an 8-bit value that ``expr`` is bound to."""
        call = bound_value(self, expr)
        found = self._per_tensor(call, _DEQUANTIZE)
        if found is None or _dtype(found[0]) not in _EIGHT_BIT or str(call.attrs.out_dtype) != "float32":
            return None
        return call

    def _requantized(self, value: Any, dequantize: relax.Call, quantize: relax.Call) -> Any:
        """``value`` (8-bit at ``dequantize``'s parameters) at ``quantize``'s parameters and dtype."""
        _, scale, zero_point = self._per_tensor(dequantize, _DEQUANTIZE) or (None, 0.0, 0.0)
        _, out_scale, out_zp = self._per_tensor(quantize, _QUANTIZE) or (None, 0.0, 0.0)
        out_dtype = str(quantize.attrs.out_dtype)
        if (scale, zero_point) == (out_scale, out_zp) and _dtype(value) == out_dtype:
            return value
        dq = self.builder_.emit(relax.op.dequantize(value, dequantize.args[1], dequantize.args[2],
                                                    int(dequantize.attrs.axis), "float32"))
        return self.builder_.emit(relax.op.quantize(dq, quantize.args[1], quantize.args[2],
                                                    int(quantize.attrs.axis), out_dtype))

    def _max_pool(self, quantize: relax.Call, pool: relax.Call) -> Any:
        dq = self._dequantized(pool.args[0])
        if dq is None:
            return None
        a = pool.attrs
        pooled = self.builder_.emit(relax.op.nn.max_pool2d(
            dq.args[0], pool_size=a.pool_size, strides=a.strides, padding=a.padding, dilation=a.dilation,
            ceil_mode=bool(a.ceil_mode), count_include_pad=bool(a.count_include_pad), layout=a.layout,
            out_layout=a.out_layout))
        return self._requantized(pooled, dq, quantize)

    def _move(self, quantize: relax.Call, move: relax.Call) -> Any:
        dq = self._dequantized(move.args[0])
        if dq is None:
            return None
        moved = self.builder_.emit(relax.Call(move.op, [dq.args[0], *move.args[1:]], move.attrs))
        return self._requantized(moved, dq, quantize)

    def _concat(self, quantize: relax.Call, concat: relax.Call) -> Any:
        fields = bound_value(self, concat.args[0])
        if not isinstance(fields, relax.Tuple):
            return None
        inputs = [self._dequantized(f) for f in fields.fields]
        if not inputs or any(dq is None for dq in inputs):
            return None
        parts = [self._requantized(dq.args[0], dq, quantize) for dq in inputs]  # type: ignore[union-attr]
        return relax.op.concat(parts, axis=concat.attrs.axis)


@tvm.transform.module_pass(opt_level=0, name="KilnEightBitDataMovement")
class EightBitDataMovement:
    """``quantize(max_pool2d | concat | reshape | permute_dims(dequantize(8-bit)...))`` -> the same operator
    on the 8-bit values.

    Runs after ``QuantizedConvToInteger`` and before ``PerTensorQDQToArithmetic``: the
    requantizations it leaves (a concat input at other parameters) are lowered like the others."""

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _EightBitDataMovement(mod)
        out = rewrite_functions(mod, rewriter)
        self.rewritten = rewriter.rewritten
        return relax.transform.DeadCodeElimination()(out) if self.rewritten else out
