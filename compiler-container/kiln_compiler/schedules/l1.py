"""L1 set conflicts of a register tile's input streams (what caps the pixels of a conv/matmul tile).

Each pixel of a tile reads its own input stream (its row of input channels in NHWC) through the
reduction, one broadcast per step. When consecutive pixels' inputs lie a multiple of the L1 way size
apart (4 KiB: 1024 fp32 input channels, or 512 at stride 2), every stream maps to the same L1 set;
more streams than the set has ways evict each other on every step. ResNet-50's 1x1 convolutions
from 1024 channels at 14x14 ran at 89 GFLOP/s with 14-pixel tiles and at 114 with 7 (1 thread,
AVX-512, the kernel alone): 14 streams in 8 ways. The tile search keeps the pixels that share a
set below the ways, one way left for the weight stream.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import tvm
from tvm import tirx
from tvm.sym import Analyzer

# L1 data cache of the cores Kiln's x86 targets run on (Haswell to Sapphire Rapids, Zen 2 to Zen 4):
# 32-48 KiB, 64-byte lines, 4 KiB per way, 8 ways or more (Neoverse: 16 KiB per way, 4 ways; its
# input strides are then conflict free up to 4 pixels of 4 KiB apart, so the x86 model is kept).
_WAY_BYTES, _LINE_BYTES, _WAYS = 4096, 64, 8
_STREAMS_PER_SET = _WAYS - 1  # one way for the weights


def pixel_steps(block: Any, broadcast_reads: list[Any], h_axis: int | None, w_axis: int | None) -> tuple[int, int]:
    """Bytes between the input addresses of neighbouring output pixels (next row, next column).

    The largest step over ``broadcast_reads`` (the reads a pixel tile does not share, such as the
    conv's input); 0 where an axis is absent or a step is not a constant."""
    steps = []
    for axis in (h_axis, w_axis):
        step = 0
        if axis is not None:
            var = block.iter_vars[axis].var
            for read in broadcast_reads:
                step = max(step, _step(read, var, [iv.var for iv in block.iter_vars]))
        steps.append(step)
    return steps[0], steps[1]


def _step(read: Any, var: Any, block_vars: list[Any]) -> int:
    buf = read.source
    if not all(isinstance(d, tirx.IntImm) for d in buf.shape):
        return 0
    offsets = []
    for value in (0, 1):
        analyzer = Analyzer()
        for v in block_vars:
            analyzer.bind(v, tirx.IntImm(str(v.ty), value if v.same_as(var) else 0))
        flat: Any = tirx.IntImm("int64", 0)
        for rng, dim in zip(read.region, buf.shape, strict=True):
            flat = flat * int(dim) + tirx.Cast("int64", rng.min)
        offset = analyzer.simplify(flat)
        if not isinstance(offset, tirx.IntImm):
            return 0
        offsets.append(int(offset))
    return abs(offsets[1] - offsets[0]) * max(1, tvm.DataType(buf.dtype).bits // 8)


def streams_per_set(rows: int, cols: int, step_h: int, step_w: int) -> int:
    """Most input streams of a ``rows`` x ``cols`` pixel tile that map to one L1 set."""
    sets = Counter(((i * step_h + j * step_w) % _WAY_BYTES) // _LINE_BYTES for i in range(rows) for j in range(cols))
    return max(sets.values())


def fits(rows: int, cols: int, step_h: int, step_w: int) -> bool:
    """Whether the streams of a ``rows`` x ``cols`` tile share no L1 set beyond its ways (weights kept)."""
    return streams_per_set(rows, cols, step_h, step_w) <= _STREAMS_PER_SET


def conflict_free_run(limit: int, step: int) -> int:
    """The most consecutive pixels (at most ``limit``, at least 1) ``step`` bytes apart that fit."""
    n = max(1, limit)
    while n > 1 and not fits(1, n, 0, step):
        n -= 1
    return n
