"""Sliding-window kernels in NHWC: depthwise convolutions and pooling (max, average, global average).

Every input value such a kernel reads belongs to one output channel (a depthwise weight or a pooling
window follows the channel), so no input is broadcast across a vector of channels as in a dense
convolution: each multiply-add needs one input vector load. The tile is a row of ``rw`` output
pixels (``rh`` rows on narrow maps) x whole vectors of channels, the window (kh, kw) reduced inside
the tile with the accumulators in registers, pixel tiles outermost so a task reads and writes
contiguous NHWC memory, the elementwise epilogue (batch norm, relu, the average's division) in the
write-back. The padded input is **not** materialised: its bounds check runs once per window tap
and vector of channels, where a separate padded copy cost more than the window itself (ShuffleNet's
depthwise 3x3 at 28x28: 73 -> 27 us, its stem max pool: 122 -> 26 us, 1 thread, AVX-512; ADR 0026).
"""

from __future__ import annotations

import contextlib
from typing import Any

from kiln.isa import VectorUnit
from tvm.s_tir import Schedule

from .knobs import DEFAULT_KNOBS, TileKnobs
from .tir import COMM_REDUCE, DATA_PAR, inline_epilogues, iter_extents, vars_in

# accumulators a window tile keeps besides the weight vector and the input vector of each step
_SPARE_REGISTERS = 2
# fewest accumulators that hide the latency of a dependent add/FMA chain (2 pipes x 4 cycles)
_MIN_ACCUMULATORS = 8


def is_window_kernel(sch: Schedule, block: Any) -> bool:
    """Whether ``block`` is an NHWC sliding-window reduction: spatial (n, h, w, c) then reduction
    axes, and every buffer it reads indexed by the channel (depthwise conv, pooling)."""
    b = sch.get(block)
    extents = iter_extents(b)
    kinds = [iv.iter_type for iv in b.iter_vars]
    if extents is None or len(kinds) < 5 or kinds[:4] != [DATA_PAR] * 4 or \
            any(k != COMM_REDUCE for k in kinds[4:]):
        return False
    if len(sch.get_loops(block)) != len(kinds) or extents[3] < 2:
        return False
    channel = b.iter_vars[3].var
    return all(channel in vars_in([r]) for r in b.reads)


def _divisor(extent: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(extent, limit)) + 1) if extent % d == 0)


def _channel_tile(channels: int, lanes: int, vectors: int) -> int:
    """Channels per tile: up to ``vectors`` whole vectors, else half or quarter vectors, else all."""
    for f in [lanes * n for n in range(vectors, 0, -1)] + [lanes // 2, lanes // 4]:
        if f > 1 and channels % f == 0:
            return f
    return channels if channels < lanes else _divisor(channels, lanes)


def schedule_window(sch: Schedule, block: Any, vector: VectorUnit, knobs: TileKnobs = DEFAULT_KNOBS) -> None:
    """Tile the window kernel ``block`` (see :func:`is_window_kernel`) in place.

    ``knobs`` (what tuning varies): ``max_vectors`` channel vectors per tile (default: one, more
    when the map has too few pixels for enough accumulators, as a global pool), ``max_pixels``
    pixels per tile, ``channels_outer`` channel tiles outside the pixel tiles.
    """
    extents = iter_extents(sch.get(block))
    assert extents is not None
    _, height, width, channels = extents[:4]
    lanes = vector.lanes
    pixels_budget = max(1, vector.registers - _SPARE_REGISTERS)
    vectors = knobs.max_vectors
    if vectors is None:
        vectors = 1
        while vectors < 4 and height * width * vectors < _MIN_ACCUMULATORS and channels % (2 * vectors * lanes) == 0:
            vectors *= 2
    cf = _channel_tile(channels, lanes, vectors)
    nv = -(-cf // lanes)
    limit = max(1, min(knobs.max_pixels, pixels_budget // nv))
    rw = _divisor(width, limit)
    rh = _divisor(height, max(1, limit // rw))

    # the padded input is read through its bounds check instead of a copy
    for producer in sch.get_producers(block):
        with contextlib.suppress(Exception):  # not an injective copy: it stays materialised
            sch.compute_inline(producer)
    # "global": kept on the stack like the conv tiles' accumulators, not a workspace per tile (ADR 0057)
    write_back = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, write_back)
    loops = sch.get_loops(block)
    n, h, w, c = loops[:4]
    window = loops[4:]
    ho, hi = sch.split(h, [None, rh])
    wo, wi = sch.split(w, [None, rw])
    co, ci = sch.split(c, [None, cf])
    if knobs.channels_outer:
        sch.reorder(n, co, ho, wo, *window, hi, wi, ci)
        outer = sch.fuse(n, co, ho, wo)
        at = outer
    else:
        # pixel tiles outermost: a task covers whole pixels, contiguous in NHWC
        sch.reorder(n, ho, wo, co, *window, hi, wi, ci)
        outer = sch.fuse(n, ho, wo)
        at = co
    sch.reverse_compute_at(write_back, at)
    wb_loops = sch.get_loops(write_back)
    depth = next(i for i, lp in enumerate(wb_loops) if sch.get(lp).same_as(sch.get(at)))
    wb_inner = wb_loops[depth + 1:]
    if wb_inner:
        sch.vectorize(wb_inner[-1])
        for lp in wb_inner[:-1]:
            sch.unroll(lp)
    sch.parallel(outer)
    sch.unroll(hi)
    sch.unroll(wi)
    sch.vectorize(ci)
    sch.decompose_reduction(block, window[0])

