"""Kiln's default CPU schedules: register-tiled reductions, fused epilogues, vectorised elementwise.

The anchor reduction of a fused kernel (conv2d, matmul/dense, pooling) is register-tiled as
rh x rw output pixels (or P pixels of the fused H*W axis and a tail tile, ADR 0025) x 1-3 vectors
of output channels (AVX-512 16 lanes, AVX2 8, NEON 4, from ``kiln.isa``); the reduction (kh, kw, ic) runs inside the tile with the accumulators in registers;
fused elementwise epilogues (bias, batch norm, residual add, relu) are inlined into the tile's
write-back; the outer loops are fused and parallel; the constant weights are re-packed into the
tile's access order at compile time (see ``kiln_compiler.pipeline``). Everything else is
parallelised and vectorised. Imports neither the tuner nor the pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from kiln.isa import VectorUnit
from tvm import tirx
from tvm.s_tir import Schedule

from . import l1
from .channel_window import schedule_channel_window
from .concat import schedule_concat
from .knobs import DEFAULT_KNOBS, TileKnobs
from .tir import (
    COMM_REDUCE,
    DATA_PAR,
    buffer_bytes,
    has_root,
    inline_epilogues,
    is_at_root,
    is_scheduled,
    iter_extents,
    loop_extent,
    reduction_blocks,
    slice_at_tile,
    vars_in,
    writes_output,
)
from .window import is_window_kernel, schedule_window

log = logging.getLogger(__name__)


def pick_factor(extent: int, limit: int, quantum: int = 1) -> int:
    """The divisor of ``extent`` <= ``limit`` that best fills vectors of ``quantum`` lanes."""
    best, best_score = 1, 0.0
    for d in range(1, min(extent, limit) + 1):
        if extent % d:
            continue
        padded = -(-d // quantum) * quantum
        score = d * d / padded
        if score >= best_score:
            best, best_score = d, score
    return best


def _schedule_elementwise(sch: Schedule, block: Any, lanes: int) -> None:
    """Parallel outer loops, vectorised innermost axis.

    The innermost axis (channels in NHWC) stays its own loop, split into whole vectors: fusing
    it with the outer axes made a per-channel operand's index a modulo of the fused index, which
    LLVM turns into gathers (DenseNet's batch norms ran 20x slower than a copy). An innermost
    axis narrower than a vector is fused with its neighbours instead.
    """
    b = sch.get(block)
    loops = sch.get_loops(block)
    if not loops:
        return
    if len(loops) != len(b.iter_vars) or any(
        not isinstance(sch.get(lp).extent, tirx.IntImm) for lp in loops
    ):
        return
    n_lead = 0
    for iv in b.iter_vars:
        if iv.iter_type != DATA_PAR:
            break
        n_lead += 1
    if n_lead == 0:
        return
    lead = list(loops[:n_lead])
    all_spatial = n_lead == len(loops)
    if all_spatial:
        # widen the vectorised axis until it holds at least one vector
        inner = [lead.pop()]
        while lead and loop_extent(sch, inner) < lanes:
            inner.insert(0, lead.pop())
        width = loop_extent(sch, inner)
        fused_inner = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        if width >= lanes:
            vec = next((lanes * n for n in (4, 2, 1) if width % (lanes * n) == 0), 0) \
                or pick_factor(width, lanes * 4, lanes)
            if vec > 1 and vec < width:
                io, ii = sch.split(fused_inner, [None, vec])
                lead.append(io)
                fused_inner = ii
            sch.vectorize(fused_inner)
        else:
            lead.append(fused_inner)
    if not lead:
        return
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    if int(sch.get(fused).extent) > 1:
        sch.parallel(fused)


def _inline_intermediates(sch: Schedule, root: Any, anchor: Any | None) -> None:
    """Inline every block whose result is not a function output (injective chains, pads, bias
    broadcasts): a fused batch norm + relu is one pass over memory instead of seven. The
    anchor's producers (a padded input) stay materialised: inlined, a pad's bounds check would
    run in the convolution's innermost loop."""
    changed = True
    while changed:
        changed = False
        for blk in sch.get_child_blocks(root):
            if writes_output(sch, blk) or not is_at_root(sch, blk):
                continue  # outputs, and the blocks of a scheduled tile, stay
            if anchor is not None and any(sch.get(c).same_as(sch.get(anchor)) for c in sch.get_consumers(blk)):
                continue
            try:
                sch.compute_inline(blk)
                changed = True
                break
            except Exception:
                continue


def _vector_factor(extent: int, lanes: int, max_vectors: int) -> int:
    """Output-channel tile: whole vectors (up to ``max_vectors``), else half/quarter vectors."""
    for f in [lanes * n for n in range(max_vectors, 0, -1)] + [lanes // 2, lanes // 4]:
        if f > 1 and extent % f == 0:
            return f
    if extent <= 2 * lanes:
        return extent
    return pick_factor(extent, 2 * lanes, lanes)


def _half_vector_unit(vector: VectorUnit, channels: int) -> VectorUnit:
    """The vector unit a tile over ``channels`` output channels uses: an odd number of half vectors (ShuffleNet's
    24-channel stem on AVX-512) is tiled in half-width vectors (ymm, all 32 registers with AVX-512VL), so one
    input broadcast feeds three of them: tiled in 16 lanes, 24 channels left one 8-lane vector per channel tile,
    each of the three tiles broadcasting every input again (ADR 0054)."""
    half = vector.lanes // 2
    if vector.lanes < 16 or channels % vector.lanes == 0 or channels % half:
        return vector
    return VectorUnit(half, vector.registers)


def register_budget(vector: VectorUnit, n_vectors: int) -> int:
    """Accumulators a tile of ``n_vectors`` channel vectors may keep in registers.

    Each reduction step loads ``n_vectors`` weight vectors and broadcasts one input value into
    a register; every other vector register can hold an accumulator: 16 ymm (AVX2) leave 14
    for one vector (a 13-pixel row fits) and 13 for two, 32 zmm (AVX-512) or NEON q 30 and 29.
    """
    return max(1, vector.registers - n_vectors - 1)


# The core the tile model assumes (Haswell to Zen 4, Skylake-SP, Neoverse N1 alike): two FMA
# pipes, two loads per cycle, four cycles of FMA latency.
_FMAS_PER_CYCLE, _LOADS_PER_CYCLE, _FMA_LATENCY = 2, 2, 4
# A row tile set against a fused-pixel tile is rated with this much more FMA latency: at exactly
# 2 pipes x 4 cycles of accumulators (4 pixels x 2 AVX2 vectors on 14x14, 28x28, 56x56 maps) the
# model rates it at full speed, but it ran 4-8% slower than a fused 6 x 2 tile (no slack for the
# loads between the FMAs of a step; ADR 0033). Tiles of 10 or more accumulators are not affected.
_ROW_TILE_LATENCY_SLACK = 1


def tile_rate(pixels: int, n_vectors: int, useful_lanes: int, latency: int = _FMA_LATENCY) -> float:
    """Useful output lanes a pixels x n_vectors tile computes per cycle of its reduction step.

    A step issues pixels * n_vectors FMAs and loads n_vectors weight vectors plus one broadcast
    per pixel; each accumulator's FMA waits for the previous step's (latency). So 1 pixel x 1
    vector runs at an eighth of the FMA rate, and 14 pixels x 1 vector (15 loads per 14 FMAs)
    is load bound where 4 x 2 is not: on AVX2 that choice made ResNet-50 30% slower.
    """
    cycles = max(pixels * n_vectors / _FMAS_PER_CYCLE, (pixels + n_vectors) / _LOADS_PER_CYCLE, latency)
    return pixels * useful_lanes / cycles


# Data a thread re-reads across tiles stays cached when it is at most this big: the L2 of
# the smallest core Kiln targets (AMD Zen 3: 512 KiB; Intel server cores and Graviton have more).
_CACHE_BYTES = 512 * 1024


def channel_tiles_outermost(block: Any, weight_reads: list[Any], n_channel_tiles: int,
                            n_pixel_tiles: int) -> bool:
    """Loop order of a conv/matmul tile grid that moves the fewest bytes from memory.

    Channel tiles outermost reads the weights once and the input once per channel tile;
    pixel tiles outermost reads the input once and the weights once per pixel tile. A re-read
    costs nothing while the re-read data fits in cache. ResNet-50's 3x3 layers at 7x7 carry
    9.4 MB of weights over a 100 KB input: pixel tiles outermost streamed them 7 times.
    Channel tiles stay outermost unless the other order moves less than half the bytes: the
    input estimate counts the whole buffer, though a strided layer reads only part of it.
    """
    weights = sum(buffer_bytes(r.source) for r in weight_reads)
    inputs = sum(buffer_bytes(r.source) for r in block.reads
                 if not any(r.source.same_as(w.source) for w in weight_reads))
    channels_outer = weights + inputs * (n_channel_tiles if inputs > _CACHE_BYTES else 1)
    pixels_outer = inputs + weights * (n_pixel_tiles if weights > _CACHE_BYTES else 1)
    return channels_outer <= 2 * pixels_outer


def _schedule_anchor(sch: Schedule, block: Any, vector: VectorUnit, knobs: TileKnobs = DEFAULT_KNOBS) -> bool:
    """Register-tile a reduction block (conv2d, matmul, pooling). Returns False if it does not fit.

    The tile is ``reg_f`` output pixels (rows for matmul) x ``vec_f`` output channels
    (columns): the channel axis is the innermost, contiguous output axis (NHWC, see
    kiln_compiler.graph) and is vectorised; the pixel axes (every spatial axis absent from the
    weight read, fused into one) are unrolled, so each input value loaded is one broadcast
    feeding a whole vector of channels and each weight vector feeds ``reg_f`` accumulators.
    The reduction (kh, kw, ic) runs inside the tile; the tile's accumulators stay in registers.
    """
    b = sch.get(block)
    extents = iter_extents(b)
    loops = sch.get_loops(block)
    if extents is None or len(loops) != len(b.iter_vars):
        return False
    kinds = [iv.iter_type for iv in b.iter_vars]
    if any(k not in (DATA_PAR, COMM_REDUCE) for k in kinds):
        return False
    sp = [i for i, k in enumerate(kinds) if k == DATA_PAR]
    rd = [i for i, k in enumerate(kinds) if k == COMM_REDUCE]
    # loops must be in block-iter order, spatial first
    if not sp or not rd or max(sp) > min(rd):
        return False
    cand = [i for i in sp if extents[i] > 1]
    if not cand:
        return False
    vec = cand[-1]
    vvar = b.iter_vars[vec].var
    # pixel axes: spatial axes absent from every input read that the vector axis indexes
    # (output pixels for conv, rows for matmul): a loaded input value is reused by them.
    reads_with_vec = [r for r in b.reads if vvar in vars_in([r])]
    pix = [i for i in sp if i != vec and not any(b.iter_vars[i].var in vars_in([r]) for r in reads_with_vec)]
    pix_big = [i for i in pix if extents[i] > 1]
    if pix_big and pix_big == list(range(pix_big[0], pix_big[-1] + 1)):
        pix = pix_big
    elif pix_big:
        pix = [max(pix_big, key=lambda i: extents[i])]
    else:
        # depthwise convolution, pooling: every input read follows the channel, so no input
        # value is shared across a pixel tile, but the weights are, and a tile of pixels gives
        # each task enough work (one pixel x 8 channels per task ran at 12 GFLOP/s)
        pix = [i for i in sp if i != vec and extents[i] > 1][-2:]
    slice_in_tile = vector.lanes >= 16  # AVX-512 (measured, see _slice_in_tile)
    vector = _half_vector_unit(vector, extents[vec])
    lanes = vector.lanes
    # the tile: rh x rw output pixels (rw along the row) x nvec vectors of channels, with
    # rh | H and rw | W so every index stays affine (exact write-back, weights re-packable)
    ph, pw = (pix[-2], pix[-1]) if len(pix) >= 2 else (None, pix[-1] if pix else None)
    # pixels whose input streams share an L1 set beyond its ways evict each other (schedules/l1.py)
    step_h, step_w = l1.pixel_steps(b, [r for r in b.reads if all(not r.same_as(w) for w in reads_with_vec)], ph, pw)
    # score: useful lanes per cycle of the tile's reduction step (tile_rate), then fewest loads
    # per FMA. (4 vectors x 7 pixels measured slower than 2 x 14 on AVX-512: 28 accumulators +
    # 4 weight vectors spill; the register budget now excludes that.)
    best: tuple[tuple[float, float], int, int, int] | None = None  # (score, vec_f, rh, rw)
    vector_choices: tuple[int, ...] = (2, 1) if pix else (4,)
    if pix and extents[vec] % (2 * lanes) and extents[vec] % (3 * lanes) == 0:
        # an odd number of whole vectors (ShuffleNet's 72 or 144 channels per group): three
        # vectors x 4 pixels fill AVX2's FMA pipes where one vector x 14 pixels is load bound
        vector_choices = (3, 1)
    if knobs.max_vectors is not None and pix:
        vector_choices = (knobs.max_vectors,)
    for max_vectors in vector_choices:
        vf = _vector_factor(extents[vec], lanes, max_vectors)
        nv = -(-vf // lanes)
        limit = max(1, min(knobs.max_pixels, register_budget(vector, nv) // nv))
        rw = pick_factor(extents[pw], l1.conflict_free_run(limit, step_w)) if pw is not None else 1
        rh_limit = max(1, limit // rw)
        while rh_limit > 1 and not l1.fits(rh_limit, rw, step_h, step_w):
            rh_limit -= 1
        rh = pick_factor(extents[ph], rh_limit) if ph is not None else 1
        score = (tile_rate(rh * rw, nv, min(vf, nv * lanes)), -(nv + rh * rw) / (nv * rh * rw))
        if best is None or score > best[0]:
            best = (score, vf, rh, rw)
    assert best is not None
    _, vec_f, rh, rw = best
    n_pixel_tiles = (extents[ph] // rh if ph is not None else 1) * (extents[pw] // rw if pw is not None else 1)
    fused_p = 0
    if ph is not None and pw is not None and knobs.fused_pixels is not False:
        pixels = extents[ph] * extents[pw]
        fused_p, fused_vf, fused_score = _fused_pixel_tile(pixels, extents[vec], vector, vector_choices, knobs,
                                                           step_w)
        row_nv = -(-vec_f // lanes)
        row_rate = tile_rate(rh * rw, row_nv, min(vec_f, row_nv * lanes), _FMA_LATENCY + _ROW_TILE_LATENCY_SLACK)
        if fused_p and (knobs.fused_pixels or fused_score[0] > row_rate * _FUSED_TILE_MARGIN):
            vec_f, n_pixel_tiles = fused_vf, -(-pixels // fused_p)
        else:
            fused_p = 0
    n_channel_tiles = extents[vec] // vec_f

    # epilogues: inline elementwise consumers into the write-back of the tile
    # "global": TVM keeps a small global buffer on the stack (registers after LLVM); a "local" one was a
    # workspace allocated and freed per tile, its accumulators moved through memory (ADR 0057, schedules/stack.py)
    wb_block = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, wb_block)
    if fused_p:
        assert ph is not None and pw is not None
        _fuse_pixel_axes(sch, block, wb_block, ph, extents[pw])
        # the fused pixel axis takes ph's place, the axes after pw move up by one
        b = sch.get(block)
        kinds = [iv.iter_type for iv in b.iter_vars]
        sp = [i for i, k in enumerate(kinds) if k == DATA_PAR]
        rd = [i for i, k in enumerate(kinds) if k == COMM_REDUCE]
        vec, pw, ph, rw, rh = vec - 1, ph, None, fused_p, 1

    loops = sch.get_loops(block)
    vo, vi = sch.split(loops[vec], [None, vec_f])
    tile_outer, tile_inner = [], []
    for axis, factor in ((ph, rh), (pw, rw)):
        if axis is None:
            continue
        o, i = sch.split(loops[axis], [None, factor])
        tile_outer.append(o)
        tile_inner.append(i)
    outer = [loops[i] for i in sp if i not in (vec, ph, pw)]
    if not tile_outer:
        outer.append(vo)
    elif knobs.channels_outer if knobs.channels_outer is not None else channel_tiles_outermost(
            b, reads_with_vec, n_channel_tiles, n_pixel_tiles):
        outer += [vo, *tile_outer]
    else:
        outer += [*tile_outer, vo]
    inner = [*tile_inner, vi]
    sch.reorder(*outer, *[loops[i] for i in rd], *inner)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.reverse_compute_at(wb_block, fused)
    # write-back: vectorise its innermost loop
    wb_loops = sch.get_loops(wb_block)[1:]
    if wb_loops:
        _vectorize_whole(sch, wb_loops[-1], vec_f, lanes)
        if len(wb_loops) > 1:
            sch.unroll(wb_loops[-2])
    if slice_in_tile and kinds == [DATA_PAR] * 4 + [COMM_REDUCE] and extents[2] == 1:
        _slice_in_tile(sch, wb_block, fused)  # a grouped matmul (pixels, groups, 1, out, in) on AVX-512
    sch.parallel(fused)
    for loop in tile_inner:
        sch.unroll(loop)
    _vectorize_whole(sch, vi, vec_f, lanes)
    sch.decompose_reduction(block, loops[rd[0]])
    return True


def _slice_in_tile(sch: Schedule, write_back: Any, tile: Any) -> None:
    """Compute each tile's part of the slice that drops a grouped matmul's padded channels (and what follows
    it: a residual add, a relu) in the tile, from the tile's write-back, instead of writing the whole padded
    result to memory and slicing it in a pass of its own (ADR 0054). The write-back's buffer is then used only
    inside the tile: lowering gives it the tile's size, on the stack (ADR 0057).

    The write-back still stores whole vectors (ADR 0042 read the accumulators themselves at the slice's odd
    width: 1.8x slower); the slice reads them back from L1 and stores its odd width as whole vectors and a short
    tail (34 channels: 2 zmm and a 2-lane store). Measured faster on AVX-512 only: on AVX2 the residual units'
    kernels ran up to 1.4x slower so (1 thread, the kernel alone)."""
    consumers = sch.get_consumers(write_back)
    if len(consumers) != 1 or not is_at_root(sch, consumers[0]):
        return
    out = [int(d) for d in sch.get(write_back).writes[0].source.shape]
    extents = iter_extents(sch.get(consumers[0]))
    if extents is None or len(extents) != len(out) or extents == out:
        return
    loops = slice_at_tile(sch, write_back, tile)
    if loops is not None and len(loops) > 1:
        sch.unroll(loops[-2])


# A fused-pixel tile must beat the best row tile by this much in tile_rate: its input addresses
# (p // W, p % W per pixel, a tile spanning two rows) cost what the model does not count. At equal
# rate, 13 fused pixels x 2 vectors ran SqueezeNet's 3x3 at 55x55 12% slower than 11-pixel rows (AVX-512).
_FUSED_TILE_MARGIN = 1.05


def _fused_pixel_tile(pixels: int, channels: int, vector: VectorUnit, vector_choices: tuple[int, ...],
                      knobs: TileKnobs, step: int = 0) -> tuple[int, int, tuple[float, float]]:
    """(pixels per tile, channel factor, score) of the best tile over the fused H*W axis.

    The last tile of each channel tile is a tail (``pixels % P`` pixels); the score is the rate
    of the whole grid: full tiles and the tail at their own tile_rate. A 13x13 map has no row
    tile between 1 and 13: fused, 169 pixels are 28 tiles of 6 and a tail of 1. ``step``: bytes between
    neighbouring pixels' inputs (caps the pixels by L1 sets, schedules/l1.py).
    """
    best: tuple[int, int, tuple[float, float]] = (0, 0, (0.0, 0.0))
    for max_vectors in vector_choices:
        vf = _vector_factor(channels, vector.lanes, max_vectors)
        nv = -(-vf // vector.lanes)
        useful = min(vf, nv * vector.lanes)
        limit = l1.conflict_free_run(max(1, min(knobs.max_pixels, register_budget(vector, nv) // nv)), step)
        for p in range(2, limit + 1):
            tail = pixels % p
            cycles = pixels // p * p * useful / tile_rate(p, nv, useful)
            if tail:
                cycles += tail * useful / tile_rate(tail, nv, useful)
            score = (pixels * useful / cycles, -(nv + p) / (nv * p))
            if score > best[2]:
                best = (p, vf, score)
    return best


def _fuse_pixel_axes(sch: Schedule, block: Any, write_back: Any, ph: int, width: int) -> None:
    """Rewrite the tile's block, its local accumulator buffer and its write-back over one fused
    pixel axis (``h * width + w`` in place of the adjacent axes ``ph``, ``ph + 1``).

    Fusing only the loops leaves the accumulator indexed by (p // W, p % W): the region TVM
    infers for a tile of P fused pixels is then every row it touches, and the write-back copied
    pixels another tile computes (ADR 0005). Indexed by p itself, the region is the tile's own.
    """
    pw = ph + 1

    def fuse(*ivs: Any) -> list[Any]:
        return [*ivs[:ph], ivs[ph] * width + ivs[pw], *ivs[pw + 1:]]

    n_block, n_wb = len(sch.get(block).iter_vars), len(sch.get(write_back).iter_vars)
    sch.transform_layout(block, ("write", 0), tirx.IndexMap.from_func(fuse, ndim=len(sch.get(block).writes[0].region)))
    sch.transform_block_layout(block, tirx.IndexMap.from_func(fuse, ndim=n_block))
    sch.transform_block_layout(write_back, tirx.IndexMap.from_func(fuse, ndim=n_wb))


def _vectorize_whole(sch: Schedule, loop: Any, extent: int, lanes: int) -> None:
    """Vectorise ``loop``; three vectors become an unrolled loop over one-vector lanes: LLVM
    legalises a 24- or 48-lane vector badly (a 3-vector tile ran at 6 GFLOP/s)."""
    if extent % lanes == 0 and extent // lanes == 3:
        outer, loop = sch.split(loop, [None, lanes])
        sch.unroll(outer)
    sch.vectorize(loop)


def schedule_cpu_func(func: tirx.PrimFunc, vector: VectorUnit) -> tirx.PrimFunc:
    """Kiln's default CPU schedule for one PrimFunc (raises when it does not apply)."""
    return default_schedule(func, vector).mod["main"]


def default_schedule(func: tirx.PrimFunc, vector: VectorUnit, knobs: TileKnobs = DEFAULT_KNOBS) -> Schedule:
    """The traced schedule of Kiln's default CPU schedule for ``func`` (``knobs`` override the
    tile's heuristic choices).

    Its trace replays on ``func`` (MetaSchedule records it as a tuning candidate, see
    tuning.py). The returned module's ``layout_free_buffers`` lists only the buffers the anchor
    tile reads (the weights): a broadcast bias read by the inlined epilogue defeats
    RewriteLayout's cache-read, and with it the weights' re-pack.
    """
    func = _narrow_layout_free(func)
    sch = Schedule(func)
    root = sch.get_sblock("root") if has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    reductions = reduction_blocks(sch, blocks)
    anchored = False
    anchor = None
    if len(reductions) == 1:
        anchor = reductions[0]
        inline_copies(sch, blocks, anchor)
        if is_window_kernel(sch, anchor):  # depthwise conv, pooling: schedules/window.py
            schedule_window(sch, anchor, vector, knobs)
            anchored = True
        else:
            anchored = _schedule_anchor(sch, anchor, vector, knobs)
    if root is not None and not reductions:
        window = schedule_channel_window(sch, root, vector.lanes)  # bf16 LRN: its padded squares per pixel
        if window is not None:
            return window
    if root is not None:
        _inline_intermediates(sch, root, anchor if anchored else None)
        blocks = list(sch.get_child_blocks(root))
    for blk in blocks:
        if anchored and not is_at_root(sch, blk):
            continue  # the anchor's tile (init, update, write-back) is scheduled
        if not anchored and schedule_concat(sch, blk, vector.lanes):
            continue  # a concat: one loop per input (schedules/concat.py)
        _schedule_elementwise(sch, blk, vector.lanes)
    return sch


def _narrow_layout_free(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Keep in ``layout_free_buffers`` only the constants read by the single reduction block."""
    layout_free = [int(i) for i in (func.attrs or {}).get("layout_free_buffers", [])]
    if not layout_free:
        return func
    sch = Schedule(func)
    if not has_root(sch):
        return func
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = reduction_blocks(sch, blocks)
    if len(reductions) != 1:
        return func
    reads = [r.source for r in sch.get(reductions[0]).reads]
    keep = [i for i in layout_free if i < len(func.params) and any(func.params[i].same_as(b) for b in reads)]
    if not keep:
        return func.without_attr("layout_free_buffers")
    return func.with_attr("layout_free_buffers", keep)


def inline_copies(sch: Schedule, blocks: list[Any], anchor: Any) -> None:
    """Inline pure copies feeding the anchor (a zero-width pad) instead of materialising them."""
    anchor_block = sch.get(anchor)  # BlockRVs compare by handle: compare the blocks they refer to
    for blk in blocks:
        if sch.get(blk).same_as(anchor_block):
            continue
        stmt = sch.get(blk)
        value = getattr(stmt.body, "value", None)
        if type(value).__name__ not in ("BufferLoad", "TensorLoad"):
            continue
        if not any(sch.get(c).same_as(anchor_block) for c in sch.get_consumers(blk)):
            continue
        try:
            sch.compute_inline(blk)
        except Exception:
            continue


@tvm.transform.module_pass(opt_level=0, name="KilnDefaultCPUSchedule")
class DefaultCPUSchedule:
    """Apply Kiln's default CPU schedules to every PrimFunc not yet scheduled."""

    def __init__(self, vector: VectorUnit) -> None:
        self.vector = vector
        self.scheduled = 0
        self.failed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            try:
                new = schedule_cpu_func(func, self.vector)
            except Exception as exc:
                log.debug("default schedule failed for %s: %s", gv.name_hint, exc)
                self.failed.append(gv.name_hint)
                continue
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        self.scheduled = len(updates)
        return mod
