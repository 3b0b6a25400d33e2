"""Input-channel blocks of a conv tile grid: each weight block is streamed once over every pixel tile.

With the channel tiles outermost, a conv's default tile grid runs, per channel tile, every pixel tile
over the whole reduction: the channel tile's weight slice (kh * kw * C * channels) is read from DRAM by
its first pixel tile, at the FMA loop's rate, and from L2 by the others. On a 7x7 map (ResNet-50's and
DenseNet-121's last stages: 4-9 MB of weights, 7-10 pixel tiles) that first tile waits on memory while
the hardware prefetcher idles through the rest. Splitting the reduction into blocks of input channels
outside the pixel tiles (the partial sums of the whole channel tile kept in an L1-resident buffer, as
MLAS does) reads each weight block once, from L1 for every pixel tile after the first, and spreads the
weight stream over the whole kernel (ADR 0056).
"""

from __future__ import annotations

# A weight block (kh * kw * block * channels of the tile) at most this big stays in L1 with the
# partial sums and the input lines (32-48 KiB L1 data caches on the x86 cores Kiln targets).
_WEIGHT_BLOCK_BYTES = 16 * 1024
# The channel tile's partial sums (pixels x channels) stay in L1 up to this many bytes.
_PARTIAL_SUM_BYTES = 16 * 1024
# Streamed only where the channel tile's weight slice does not fit L1 (smaller slices stay in L1 anyway).
_MIN_SLICE_BYTES = 32 * 1024
# Fewer input channels per block would reload the partial sums too often: per block, each pixel tile
# loads and stores its accumulators once, against kh * kw * block reduction steps.
_MIN_STEPS = 64


def input_channel_block(window: int, in_channels: int, channels: int, pixels: int, n_pixel_tiles: int,
                        dtype_bytes: int = 4, forced: int | None = None) -> int:
    """Input channels per block of a conv tile grid's reduction, or 0 to keep one block.

    ``window``: kh * kw; ``channels``: output channels per tile; ``pixels``: output pixels of a channel
    tile (all of its pixel tiles). ``forced`` (a tuning knob): 0 keeps one block, n > 0 blocks by the
    largest divisor of ``in_channels`` not above n.
    """
    if forced is not None:
        return _divisor_at_most(in_channels, forced) if forced > 0 and n_pixel_tiles > 1 else 0
    slice_bytes = window * in_channels * channels * dtype_bytes
    if n_pixel_tiles < 2 or slice_bytes <= _MIN_SLICE_BYTES or pixels * channels * dtype_bytes > _PARTIAL_SUM_BYTES:
        return 0
    block = _divisor_at_most(in_channels, _WEIGHT_BLOCK_BYTES // (window * channels * dtype_bytes))
    if block >= in_channels or window * block < _MIN_STEPS:
        return 0
    return block


def _divisor_at_most(extent: int, limit: int) -> int:
    return max((d for d in range(1, min(extent, max(1, limit)) + 1) if extent % d == 0), default=1)
