"""Integer convolutions from QDQ graphs: ``DequantizeLinear -> Conv -> (bias) (-> Relu) -> QuantizeLinear``.

TVM's ONNX frontend lowers a QDQ model (onnxruntime's ``quantize_static``, Olive, NNCF) to
simulated quantization: every quantized tensor is dequantized and the convolution runs in fp32.
``QuantizedConvToInteger`` turns each chain

    x_f = dequantize(x_q: u8, s_x, z_x)           (per tensor)
    w_f = dequantize(W_q: s8 const, s_w, 0)       (per tensor or per output channel)
    y_f = conv2d(x_f, w_f) [+ dequantize(B_q: s32 const, s_b, 0)] [relu]
    y_q = quantize(y_f, s_y, z_y)                 (per tensor, u8 or s8)

into integer arithmetic the way ONNX Runtime's QLinearConv computes it:

    acc   = conv2d(pad(x_q, z_x), W_q, out_dtype=int32)          u8 x s8 -> s32
    acc  += B_q - z_x * sum(W_q over kh, kw, ic)                  (one s32 constant per channel)
    y_q   = saturate(round_half_even(float(acc) * s_x * s_w / s_y) + z_y)  (relu: lower bound z_y)

The input is padded with its zero point (the real value 0), so the zero-point correction is one
constant per channel, exact at the borders. The epilogue (correction, requantization, relu) is
elementwise and fuses into the convolution's kernel; ``y_q`` stays u8, so the next layer's
``dequantize`` is matched again and activations stay 8-bit between such layers. Integer
accumulation is exact; the only rounding is the final requantization, where a product that
lands within float32 rounding of a .5 tie may differ from ONNX Runtime's by 1 (quantized unit).
A bias whose scale is not ``s_x * s_w`` (not how onnxruntime writes it) is added in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutate import bound_value, rewrite_functions, static_shape
from .grouped_conv import MAX_SPLIT_GROUPS

_QUANTIZE = tvm.ir.Op.get("relax.quantize")
_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_ADD = tvm.ir.Op.get("relax.add")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_ROUND = tvm.ir.Op.get("relax.round")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_DIVIDE = tvm.ir.Op.get("relax.divide")
_MAXIMUM = tvm.ir.Op.get("relax.maximum")
_MINIMUM = tvm.ir.Op.get("relax.minimum")
_CLIP = tvm.ir.Op.get("relax.clip")
# (data layout, kernel layout) of the convolutions the rewrite takes -> (channel axis of the data, output-channel
# axis of the kernel): ONNX's NCHW/OIHW, TFLite's NHWC/HWIO (TVM's TFLite frontend)
_CONV_LAYOUTS = {("NCHW", "OIHW"): (1, 0), ("NHWC", "HWIO"): (3, 3)}
# products of (x_q - z_x) and W_q (each below 2^15 in magnitude) an fp32 sum adds exactly (below 2^24)
_EXACT_FP32_TERMS = 2**24 // (255 * 128)
# a bias scale this close to s_x * s_w is taken as exactly it (onnxruntime computes it in float32)
_BIAS_SCALE_RTOL = 1e-6


@dataclass(frozen=True)
class IntegerKernels:
    """What a target's integer convolution kernels take: the dtype of their data operand and of their weights,
    the output channels of one block of their tile (what the graph pads output channels to), the input
    channels of one reduction step, the most pixels of a tile, and whether grouped pointwise convolutions
    become integer batched matmuls."""

    activations: str
    channels: int
    weights: str = "int8"
    steps: int = 4
    pixels: int = 16
    group_matmuls: bool = True


# AVX512-VNNI's vpdpbusd: u8 x s8, 16 s32 lanes (schedules/int8.py: one zmm of accumulators)
VNNI = IntegerKernels("uint8", 16)
# aarch64 dotprod's sdot: s8 x s8, 4 s32 lanes (schedules/int8_arm.py): u8 activations shifted by -128
SDOT = IntegerKernels("int8", 4)
# AVX2's vpmaddwd: s16 x s16 (u8 widened in the kernel, s8 weights at compile time), 8 s32 lanes, 2 input
# channels a step (schedules/int8_avx2.py, ADR 0059). 14 pixels: 14 ymm accumulators, the weight block and the
# broadcast fill the 16 (SqueezeNet's 13- and ResNet's 14-wide rows one tile each). No grouped matmuls:
# ShuffleNet's ran at 15-24 GFLOP/s (the padded-channel write-back scalarised), twice the fp32 kernels' time
AVX2 = IntegerKernels("int16", 8, weights="int16", steps=2, pixels=14, group_matmuls=False)


def _const(expr: Any) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _dtype(expr: Any) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


@dataclass(frozen=True)
class _Operand:
    """A dequantized tensor: its quantized value, scale and zero point."""

    value: Any
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int  # the per-channel axis (meaningful when scale has more than one value)


def _broadcasts_as(expr: Any, per_channel: tuple[int, ...]) -> bool:
    """Whether ``expr`` (a bias added to a convolution's output) holds one value per channel along the
    output's channel axis (a ``(C,)`` bias is per channel only when channels are the last axis)."""
    shape = static_shape(expr)
    if shape is None or len(shape) > len(per_channel):
        return False
    return (1,) * (len(per_channel) - len(shape)) + shape == per_channel


def _bound(value: Any) -> float | None:
    """A clip bound (a float or integer immediate, or a PrimValue of one) as a float."""
    for _ in range(2):
        value = getattr(value, "value", value)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _tighten_saturation(rewriter: PyExprMutator, clip: relax.Call) -> Any:
    """``clip(astype(minimum(maximum(v, lo), hi), int), a, b)`` -> ``astype(minimum(maximum(v, max(lo, a)),
    min(hi, b)), int)``: TVM's TFLite frontend writes a fused activation (relu, relu6) as a clip of the
    quantized value; as bounds of the requantization's saturation it stays in the convolution's epilogue."""
    low, high = _bound(clip.args[1]), _bound(clip.args[2])
    cast = bound_value(rewriter, clip.args[0])
    if low is None or high is None or not isinstance(cast, relax.Call) or cast.op != _ASTYPE \
            or str(cast.attrs.dtype) not in ("uint8", "int8"):
        return clip
    upper = bound_value(rewriter, cast.args[0])
    if not isinstance(upper, relax.Call) or upper.op != _MINIMUM or _const(upper.args[1]) is None:
        return clip
    lower = bound_value(rewriter, upper.args[0])
    if not isinstance(lower, relax.Call) or lower.op != _MAXIMUM or _const(lower.args[1]) is None \
            or _dtype(lower.args[0]) != "float32":
        return clip
    lo = max(float(_const(lower.args[1]).reshape(())), low)  # type: ignore[union-attr]
    hi = min(float(_const(upper.args[1]).reshape(())), high)  # type: ignore[union-attr]
    y = rewriter.builder_.emit(relax.op.maximum(lower.args[0], relax.const(np.float32(lo))))
    y = rewriter.builder_.emit(relax.op.minimum(y, relax.const(np.float32(hi))))
    return relax.op.astype(y, str(cast.attrs.dtype))


def _wider_output(data_shape: tuple[int, ...] | None, kernel_shape: tuple[int, ...], layout: tuple[str, str],
                  attrs: Any, limit: int) -> int:
    """Output columns to add so that the integer tile (up to ``limit`` pixels of a row, a divisor of the width)
    holds at least 8: SqueezeNet's 111-wide stem ran 3-pixel tiles (111 = 3 x 37); 112 runs 16. 0 if not needed."""
    if data_shape is None or len(data_shape) != 4:
        return 0
    w_in = data_shape[3 if layout[0] == "NCHW" else 2]
    k = kernel_shape[3 if layout[1] == "OIHW" else 1]
    stride, dilation = int(attrs.strides[1]), int(attrs.dilation[1])
    _, left, _, right = (int(p) for p in attrs.padding)
    width = (w_in + left + right - dilation * (k - 1) - 1) // stride + 1
    if width <= limit or _largest_divisor(width, limit) >= 8:
        return 0
    return next((e for e in range(1, 8) if _largest_divisor(width + e, limit) >= 8), 0)


def _padded_out_channels(channels: int, block: int) -> int:
    """Output channels for the integer tile (whole ``block``-channel blocks): ShuffleNet's 24-channel stem ran
    the generic s32 kernel at 44 GFLOP/s; 32 channels (a third of them zero) run ``vpdpbusd``. At most half as
    many again or fewer than 4 more (sdot's 4-channel blocks: every width fits); otherwise ``channels``."""
    padded = -(-channels // block) * block
    return padded if (padded - channels) * 2 <= channels or padded - channels < 4 else channels


def _pad_axis(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``values`` zero-padded along ``axis`` to ``size``."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (0, size - values.shape[axis])
    return np.pad(values, pad)


def _largest_divisor(extent: int, limit: int) -> int:
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


@mutator
class _IntegerConv(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, kernels: IntegerKernels | None = VNNI) -> None:
        super().__init__(mod)
        self.rewritten = 0
        self.kernels = kernels

    def _dequantized(self, expr: Any) -> _Operand | None:
        call = bound_value(self, expr)
        if not isinstance(call, relax.Call) or call.op != _DEQUANTIZE:
            return None
        scale, zero_point = _const(call.args[1]), _const(call.args[2])
        if scale is None or zero_point is None:
            return None
        return _Operand(call.args[0], scale.astype("float32"), zero_point, int(call.attrs.axis))

    def _bias(self, expr: Any, channels: int) -> tuple[_Operand | None, np.ndarray | None]:
        """A bias as (dequantized s32 constant, None) or (None, float values)."""
        value = bound_value(self, expr)
        if isinstance(value, relax.Call) and value.op == _RESHAPE:
            value = bound_value(self, value.args[0])
        floats = _const(value)
        if floats is not None and floats.dtype == np.float32 and floats.size == channels:
            return None, floats.reshape(channels)
        dq = self._dequantized(value)
        if dq is None or _dtype(dq.value) != "int32" or _const(dq.value) is None or np.any(dq.zero_point != 0):
            return None, None
        return dq, None

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op == _CLIP:
            return _tighten_saturation(self, call)
        if call.op != _QUANTIZE or str(call.attrs.out_dtype) not in ("uint8", "int8"):
            return call
        out_scale, out_zp = _const(call.args[1]), _const(call.args[2])
        if out_scale is None or out_zp is None or out_scale.size != 1 or out_zp.size != 1:
            return call
        src = bound_value(self, call.args[0])
        relu = isinstance(src, relax.Call) and src.op == _RELU
        if relu:
            src = bound_value(self, src.args[0])
        bias_expr = None
        if isinstance(src, relax.Call) and src.op == _ADD:
            for conv_side, other in ((0, 1), (1, 0)):
                cand = bound_value(self, src.args[conv_side])
                if isinstance(cand, relax.Call) and cand.op == _CONV2D:
                    src, bias_expr = cand, src.args[other]
                    break
        if not isinstance(src, relax.Call) or src.op != _CONV2D:
            return call
        new = self._integer_conv(src, bias_expr, relu, float(out_scale.reshape(())), int(out_zp.reshape(())),
                                 str(call.attrs.out_dtype))
        if new is None:
            return call
        self.rewritten += 1
        return new

    def _integer_conv(self, conv: relax.Call, bias_expr: Any, relu: bool, out_scale: float, out_zp: int,
                      out_dtype: str) -> Any:
        attrs = conv.attrs
        layout = (str(attrs.data_layout), str(attrs.kernel_layout))
        if layout not in _CONV_LAYOUTS or str(attrs.out_layout) != layout[0]:
            return None
        channel_axis, kernel_axis = _CONV_LAYOUTS[layout]
        x, w = self._dequantized(conv.args[0]), self._dequantized(conv.args[1])
        if x is None or w is None or _dtype(x.value) not in ("uint8", "int8") or x.scale.size != 1 \
                or x.zero_point.size != 1:
            return None
        w_q = _const(w.value)
        if w_q is None or w_q.dtype != np.int8 or w_q.ndim != 4 or np.any(w.zero_point != 0):
            return None
        channels = w_q.shape[kernel_axis]
        if w.scale.size not in (1, channels) or (w.scale.size > 1 and w.axis % 4 != kernel_axis):
            return None
        per_channel = tuple(channels if i == channel_axis else 1 for i in range(4))
        if bias_expr is not None and not _broadcasts_as(bias_expr, per_channel):
            return None
        bias_q, bias_f = (None, None) if bias_expr is None else self._bias(bias_expr, channels)
        if bias_expr is not None and bias_q is None and bias_f is None:
            return None
        x_scale, x_zp = float(x.scale.reshape(())), int(x.zero_point.reshape(()))
        acc_scale = (np.float32(x_scale) * np.broadcast_to(w.scale.reshape(-1), (channels,))).astype("float32")
        w_sum = w_q.astype("int64").sum(axis=tuple(i for i in range(4) if i != kernel_axis))
        # depthwise and grouped convolutions other than pointwise ones with whole 4-channel steps: the fp32
        # kernels on the integer values (below), exact while a sum holds at most _EXACT_FP32_TERMS products;
        # no u8 x s8 kernel takes them (their s32 kernels ran at 30-70 GFLOP/s)
        groups = int(attrs.groups)
        per_group = w_q.size // channels  # products per output value
        pointwise = w_q.shape[0 if layout[1] == "HWIO" else 2:][:2] == (1, 1) and \
            all(int(v) == 1 for v in attrs.strides) and not any(int(v) for v in attrs.padding)
        in_axis = 1 if layout[1] == "OIHW" else 2
        kernels = self.kernels
        # a dense convolution whose output channels make no whole tile (even padded) takes the fp32 form too
        # while it is exact: the integer schedules take whole tiles only, not an s32 kernel on the generic one
        whole = kernels is not None and _padded_out_channels(channels, kernels.channels) % kernels.channels == 0
        integer_kernels = kernels is not None and (
            (groups == 1 and whole) or per_group > _EXACT_FP32_TERMS
            # a pointwise grouped conv becomes a batched matmul (SplitGroupedConv) the integer schedules take,
            # its input channels per group padded to a multiple of 4 there (ShuffleNet's 17 and 6 per group)
            or (kernels.group_matmuls and pointwise and w_q.shape[in_axis] > 1 and groups <= MAX_SPLIT_GROUPS))
        # the activations in the kernel's dtype: s8 (TFLite) as u8 for vpdpbusd (x + 128, zero point + 128), u8
        # as s8 for sdot (x - 128: the 128 * sum(W_q) it takes off each output joins the correction below)
        shift = 0
        if integer_kernels and kernels is not None and kernels.activations in ("uint8", "int8") \
                and _dtype(x.value) != kernels.activations:  # (s16 operands take either as they are)
            shift = 128 if kernels.activations == "uint8" else -128
        x_zp += shift
        correction = -x_zp * w_sum
        if bias_q is not None:
            b_q = _const(bias_q.value)
            assert b_q is not None
            b_scale = np.broadcast_to(bias_q.scale.reshape(-1), (channels,))
            if np.allclose(b_scale, acc_scale, rtol=_BIAS_SCALE_RTOL, atol=0):
                correction = correction + b_q.astype("int64").reshape(channels)
            else:
                bias_f = (b_q.astype("float64").reshape(channels) * b_scale).astype("float32")
        if np.abs(correction).max(initial=0) >= 2**31:
            return None
        wider = 0
        block = self.kernels.channels if self.kernels is not None else 1
        sliced_channels = _padded_out_channels(channels, block) if integer_kernels and groups == 1 else channels
        if sliced_channels != channels:  # zero weights for the added channels: their outputs are sliced off
            w_q = _pad_axis(w_q, kernel_axis, sliced_channels)
            correction, acc_scale = _pad_axis(correction, 0, sliced_channels), _pad_axis(acc_scale, 0, sliced_channels)
            bias_f = None if bias_f is None else _pad_axis(bias_f, 0, sliced_channels)
            channels, sliced_channels = sliced_channels, channels
            per_channel = tuple(channels if i == channel_axis else 1 for i in range(4))

        if integer_kernels:
            data = x.value
            if shift:
                data = self.builder_.emit(relax.op.astype(self.builder_.emit(relax.op.add(
                    self.builder_.emit(relax.op.astype(data, "int16")), relax.const(shift, "int16"))),
                    self.kernels.activations))  # type: ignore[union-attr]
            padding = [int(p) for p in attrs.padding]
            # a dense convolution's input channels padded to a multiple of 4 (a 3-channel stem): the
            # integer kernels reduce 4 channels per vpdpbusd / sdot; the added weights are 0, so the padded
            # channels (any value: the zero point) add nothing and sum(W_q) is unchanged
            tile = groups == 1 and channels % block == 0  # what the integer schedules take (whole blocks)
            extra = -w_q.shape[in_axis] % self.kernels.steps if tile else 0  # type: ignore[union-attr]
            if extra:
                w_q = np.concatenate([w_q, np.zeros_like(w_q.take([0] * extra, axis=in_axis))], axis=in_axis)
            wider = _wider_output(static_shape(data), w_q.shape, layout, attrs,
                                  self.kernels.pixels) if tile else 0  # type: ignore[union-attr]
            if wider:  # extra output columns: sliced off after the epilogue
                padding[3] += wider * int(attrs.strides[1])
            if (x_zp != 0 and any(padding)) or extra:
                top, left, bottom, right = padding if x_zp != 0 else (0, 0, 0, 0)
                spatial = [top, bottom, left, right]
                pad_width = [0, 0, *spatial, 0, extra] if layout[0] == "NHWC" else [0, 0, 0, extra, *spatial]
                data = self.builder_.emit(relax.op.nn.pad(data, pad_width, pad_value=float(x_zp)))
                if x_zp != 0:
                    padding = [0, 0, 0, 0]
            weights = self.kernels.weights  # type: ignore[union-attr]
            if weights != "int8":  # s16 x s16 (AVX2): the 8-bit input widened in the kernel, the weights here
                data = self.builder_.emit(relax.op.astype(data, self.kernels.activations))  # type: ignore[union-attr]
            acc = self.builder_.emit(relax.op.nn.conv2d(
                data, relax.const(w_q.astype(weights), weights), strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                groups=int(attrs.groups), data_layout=layout[0], kernel_layout=layout[1], out_dtype="int32"))
            if np.any(correction != 0):
                acc = self.builder_.emit(relax.op.add(acc, relax.const(correction.astype("int32").reshape(per_channel))))
        else:
            # fp32 arithmetic on the integer values (x_q - z_x) and W_q: every product is exact, sums are
            # exact below 2^24; the fp32 kernels run it at fp32 speed, activations stay 8-bit in memory
            data = self.builder_.emit(relax.op.astype(x.value, "float32"))
            if x_zp:
                data = self.builder_.emit(relax.op.subtract(data, relax.const(np.float32(x_zp))))
            acc = self.builder_.emit(relax.op.nn.conv2d(
                data, relax.const(w_q.astype("float32")), strides=attrs.strides, padding=attrs.padding,
                dilation=attrs.dilation, groups=int(attrs.groups), data_layout=layout[0], kernel_layout=layout[1],
                out_dtype="float32"))
            bias_int = correction + x_zp * w_sum  # B_q alone
            if np.any(bias_int != 0):
                acc = self.builder_.emit(relax.op.add(acc, relax.const(bias_int.astype("float32").reshape(per_channel))))
        y = self.builder_.emit(relax.op.astype(acc, "float32"))
        multiplier = (acc_scale / np.float32(out_scale)).astype("float32")
        y = self.builder_.emit(relax.op.multiply(y, relax.const(multiplier.reshape(per_channel))))
        if bias_f is not None:
            y = self.builder_.emit(relax.op.add(
                y, relax.const((bias_f / np.float32(out_scale)).astype("float32").reshape(per_channel))))
        y = self.builder_.emit(relax.op.round(y))
        info = np.iinfo(out_dtype)
        low = max(out_zp, int(info.min)) if relu else int(info.min)
        if out_zp:
            y = self.builder_.emit(relax.op.add(y, relax.const(np.float32(out_zp))))
        # maximum/minimum with constants, not clip: FuseOps keeps clip out of the conv's kernel
        y = self.builder_.emit(relax.op.maximum(y, relax.const(np.float32(low))))
        y = self.builder_.emit(relax.op.minimum(y, relax.const(np.float32(info.max))))
        if not integer_kernels or (not wider and sliced_channels == channels):
            return relax.op.astype(y, out_dtype)
        y = self.builder_.emit(relax.op.astype(y, out_dtype))
        w_axis = 3 if layout[0] == "NCHW" else 2
        width = int(static_shape(y)[w_axis]) - wider  # type: ignore[index]
        axes, ends = [], []
        if wider:
            axes.append(w_axis)
            ends.append(width)
        if sliced_channels != channels:
            axes.append(channel_axis)
            ends.append(sliced_channels)
        return relax.op.strided_slice(y, axes=axes, begin=[0] * len(axes), end=ends)


@mutator
class _QDQArithmetic(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        if call.op == _CLIP:
            return _tighten_saturation(self, call)
        if call.op not in (_QUANTIZE, _DEQUANTIZE):
            return call
        scale, zero_point = _const(call.args[1]), _const(call.args[2])
        if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
            return call
        s, z = np.float32(scale.reshape(())), np.float32(zero_point.reshape(()))
        x = call.args[0]
        if call.op == _DEQUANTIZE:
            if _dtype(x) not in ("uint8", "int8") or str(call.attrs.out_dtype) != "float32":
                return call
            # (x - z) * s: exact in float32 for 8-bit x, as the legalized dequantize computes it
            y = self.builder_.emit(relax.op.astype(x, "float32"))
            if z:
                y = self.builder_.emit(relax.op.subtract(y, relax.const(z)))
            self.rewritten += 1
            return relax.op.multiply(y, relax.const(s))
        out_dtype = str(call.attrs.out_dtype)
        if _dtype(x) != "float32" or out_dtype not in ("uint8", "int8"):
            return call
        info = np.iinfo(out_dtype)
        y = self.builder_.emit(relax.op.round(self.builder_.emit(relax.op.divide(x, relax.const(s)))))
        if z:
            y = self.builder_.emit(relax.op.add(y, relax.const(z)))
        y = self.builder_.emit(relax.op.maximum(y, relax.const(np.float32(info.min))))
        y = self.builder_.emit(relax.op.minimum(y, relax.const(np.float32(info.max))))
        self.rewritten += 1
        return relax.op.astype(y, out_dtype)


@tvm.transform.module_pass(opt_level=0, name="KilnPerTensorQDQToArithmetic")
class PerTensorQDQToArithmetic:
    """Per-tensor ``quantize``/``dequantize`` of 8-bit tensors -> elementwise arithmetic.

    Runs after ``QuantizedConvToInteger`` on what it left (the Q/DQ around batch norms, residual
    adds, pools): ConvertLayout has no layout rule for quantize/dequantize and transposed around
    each of them, and FuseOps kept them out of the convolutions' kernels. As plain arithmetic
    (``(float(x) - z) * s``; ``saturate(round(y / s) + z)``, the legalized ops' formulas) they
    stay NHWC and fuse into the producing convolution's epilogue.
    """

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _QDQArithmetic(mod)
        out = rewrite_functions(mod, rewriter)
        self.rewritten = rewriter.rewritten
        return out


def _shared_vars(mod: tvm.IRModule) -> set[Any]:
    """Variables of ``mod``'s Relax functions read more than once."""
    seen: set[Any] = set()
    shared: set[Any] = set()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call):
            for arg in expr.args:
                if isinstance(arg, relax.Var):
                    (shared if arg in seen else seen).add(arg)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return shared


@mutator
class _RequantizeEpilogue(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0
        # a u8 value read by other layers too stays the kernel's (8-bit) output
        self.shared = _shared_vars(mod)

    def visit_call_(self, call: relax.Call) -> Any:
        call = super().visit_call_(call)
        return self._fold_affine(call) if call.op == _ROUND else call

    def _round_trip_source(self, expr: Any) -> Any | None:
        """``v`` when ``expr`` is ``float(u8(v))``, ``v`` integral and saturated to the integer type's range,
        and nothing else reads the 8-bit value or its float (which would then cross kernels in float32)."""
        if not isinstance(expr, relax.Var) or expr in self.shared:
            return None
        outer = bound_value(self, expr)
        if not isinstance(outer, relax.Call) or outer.op != _ASTYPE or str(outer.attrs.dtype) != "float32" \
                or outer.args[0] in self.shared:
            return None
        inner = bound_value(self, outer.args[0])
        if not isinstance(inner, relax.Call) or inner.op != _ASTYPE or str(inner.attrs.dtype) not in ("uint8", "int8"):
            return None
        info = np.iinfo(str(inner.attrs.dtype))
        value = bound_value(self, inner.args[0])
        bounds: list[tuple[Any, np.ndarray]] = []
        while isinstance(value, relax.Call) and value.op in (_MAXIMUM, _MINIMUM):
            bound = _const(value.args[1])
            if bound is None:
                break
            bounds.append((value.op, bound))
            value = bound_value(self, value.args[0])
        lows = [b for op, b in bounds if op == _MAXIMUM]
        highs = [b for op, b in bounds if op == _MINIMUM]
        if not lows or not highs or any(b.size != 1 for b in lows + highs):
            return None
        if max(float(b) for b in lows) < info.min or min(float(b) for b in highs) > info.max:
            return None
        offset = _const(value.args[1]) if isinstance(value, relax.Call) and value.op == _ADD else None
        if offset is not None and np.all(np.mod(offset, 1) == 0):
            value = bound_value(self, value.args[0])
        if not isinstance(value, relax.Call) or value.op != _ROUND:
            return None
        return inner.args[0]

    def _fold_affine(self, call: relax.Call) -> Any:
        """``round(((x - a) * b ... + c) / d)`` -> ``round(x * A + B)``: one multiply-add per element."""
        out_shape = static_shape(call)
        if out_shape is None:
            return call
        ops: list[tuple[Any, np.ndarray, bool]] = []  # (op, constant, constant on the left) from the outside in
        x = call.args[0]
        while True:
            value = bound_value(self, x)
            if not isinstance(value, relax.Call) or value.op not in (_ADD, _SUBTRACT, _MULTIPLY, _DIVIDE):
                break
            left, right = _const(value.args[0]), _const(value.args[1])
            if right is not None and right.dtype == np.float32:
                ops.append((value.op, right.astype("float64"), False))
                x = value.args[0]
            elif left is not None and left.dtype == np.float32 and value.op != _DIVIDE:
                ops.append((value.op, left.astype("float64"), True))
                x = value.args[1]
            else:
                break
        source = self._round_trip_source(x) if ops else None
        if source is not None:
            x = source
        if len(ops) < (1 if source is not None else 2) or _dtype(x) != "float32" or static_shape(x) != out_shape:
            return call
        scale, shift = np.ones(()), np.zeros(())
        for op, c, on_left in reversed(ops):
            if op == _MULTIPLY:
                scale, shift = scale * c, shift * c
            elif op == _DIVIDE:
                scale, shift = scale / c, shift / c
            elif op == _ADD:
                shift = shift + c
            elif on_left:  # c - y
                scale, shift = -scale, c - shift
            else:
                shift = shift - c
        if np.broadcast_shapes(out_shape, scale.shape, shift.shape) != out_shape:
            return call
        y = self.builder_.emit(relax.op.multiply(x, relax.const(scale.astype("float32"))))
        if np.any(shift != 0):
            y = self.builder_.emit(relax.op.add(y, relax.const(shift.astype("float32"))))
        self.rewritten += 1
        return relax.op.round(y)


@tvm.transform.module_pass(opt_level=0, name="KilnSimplifyRequantization")
class SimplifyRequantization:
    """Shorter requantizing epilogues between integer layers (after ConvertLayout and constant folding).

    * a chain of constant multiplies, divides, adds and subtracts before a ``round`` (dequantize,
      batch norm, quantize: seven operations) becomes one multiply and one add;
    * at the head of such a chain, ``float(u8(v))`` where ``v`` is already rounded and saturated
      to u8's range is ``v`` (the value a dequantize reads back is the one just computed), where
      nothing else reads the u8 value (it would cross kernels as float32 instead of 8 bits). The constants are
      composed in float64, so the result differs from the step-by-step float32 chain by float32
      rounding only; it matters only within that distance of a .5 tie (1 quantized unit).
    Only chains that end in ``round`` are touched: fp32 models have none.
    """

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _RequantizeEpilogue(mod)
        out = rewrite_functions(mod, rewriter)
        self.rewritten = rewriter.rewritten
        return relax.transform.DeadCodeElimination()(out) if self.rewritten else out


@tvm.transform.module_pass(opt_level=0, name="KilnQuantizedConvToInteger")
class QuantizedConvToInteger:
    """``dequantize -> conv2d -> (bias) (-> relu) -> quantize`` -> 8-bit x s8 -> s32 conv2d + requantize.

    ``kernels``: what the target's integer kernels take (:data:`VNNI` u8 x s8, :data:`SDOT` s8 x s8, ADR 0060,
    :data:`AVX2` s16 x s16, ADR 0059);
    None (targets without an integer dot-product kernel, ADR 0021): the same chain with the convolution in
    fp32 on the exact integer values ``x_q - z_x`` and ``W_q``."""

    def __init__(self, kernels: IntegerKernels | None = VNNI) -> None:
        self.rewritten = 0
        self.kernels = kernels

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _IntegerConv(mod, self.kernels)
        out = rewrite_functions(mod, rewriter)
        self.rewritten = rewriter.rewritten
        # the replaced fp32 chains are dead now
        return relax.transform.DeadCodeElimination()(out) if self.rewritten else out
