"""The integer convolution kernels' tiles: what the graph rewrites shape integer convolutions for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IntegerTile:
    """What an integer convolution kernel takes: its operands' type and its register tile's blocking."""

    operand: str  # the kernel's weight (and, widened from u8, input) type
    channels: int  # output channels per tile: one vector register of s32 accumulators
    steps: int  # input channels per reduction step (per dot-product instruction)
    pixels: int  # output pixels per tile at most: one accumulator register each
    group_matmuls: bool  # whether grouped pointwise convolutions (ShuffleNet's) become integer batched matmuls


# AVX512-VNNI (schedules/int8.py): u8 x s8, vpdpbusd, 16 channels x 4 input channels
VNNI = IntegerTile("int8", 16, 4, 16, True)  # 16 of the 32 zmm: accumulators
# AVX2 (schedules/int8_avx2.py): s16 x s16, vpmaddwd, 8 channels x 2 input channels (ADR 0059)
# 14 of the 16 ymm: accumulators (the 13- and 14-wide rows of SqueezeNet and ResNet as one tile each);
# 1 for the weight block, 1 for the broadcast input. No grouped matmuls: ShuffleNet's ran at 15-24 GFLOP/s
# (their padded-channel epilogue scalarised in the write-back), twice the fp32 kernels' time (ADR 0059)
AVX2 = IntegerTile("int16", 8, 2, 14, False)


def reduction_steps(weight_dtype: str) -> int:
    """Input channels per reduction step of the integer kernel whose weights are ``weight_dtype`` (0: none)."""
    return next((t.steps for t in (VNNI, AVX2) if t.operand == weight_dtype), 0)
