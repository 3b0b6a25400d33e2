"""bf16 x bf16 -> fp32 convolutions on AVX512-BF16: ``vdpbf16ps`` by tensorization (16 x 2 dot products).

The NHWC/HWIO convolution with bf16 data and weights and an fp32 result (``kiln_compiler.graph.bf16``)
is blocked as 16 output channels x 2 input channels: the weights are re-packed at compile time to
``[oc/16, kh, kw, ic/2, 16, 2]`` (a layout rewrite folded like the fp32 kernels' weights), and each
step of the reduction is one ``vdpbf16ps``: a pair of input values broadcast to 16 lanes against a
64-byte weight block, 32 products summed pairwise into 16 fp32 accumulators, twice the work of an
fp32 FMA. The register tile (rh x rw output pixels x 1-2 vectors of channels) and the loop order
come from the fp32 schedule's throughput model (``schedules.cpu``): a reduction step issues the same
loads per accumulator update. The fp32 epilogue (bias, batch norm, residual add, relu, and the cast
of the result to bf16 for the next convolution) is inlined into the tile's write-back. Kernels that
do not fit keep Kiln's default schedule.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import tvm
from kiln.isa import VectorUnit
from tvm import tirx

from ..graph.bf16 import BF16_BLOCK_IC, BF16_BLOCK_OC
from .cpu import channel_tiles_outermost, inline_copies, pick_factor, register_budget, tile_rate
from .tir import (
    inline_epilogues,
    match_group_matmul,
    match_nhwc_conv,
    parallelize_anchor_inputs,
    parallelize_serial_root_blocks,
    schedule_each,
    slice_at_tile,
    writes_output,
)

log = logging.getLogger(__name__)

BF16_INTRIN = "kiln_dot_16x2_bf16"


# vdpbf16ps as an LLVM function the tensorized kernels call (linked into each kernel's module by
# "pragma_import_llvm" and always inlined). Why not ``call_llvm_pure_intrin``: the intrinsic takes
# <32 x bfloat> operands, and TVM 0.27 has no LLVM bfloat values (BF16ComputeLegalize widens every
# bf16 expression to fp32, BF16StorageLegalize stores bf16 as uint16, and its LLVM codegen crashes on
# a bfloat16 vector); the kernel passes the bf16 pairs as <16 x i32> and the bitcast happens here.
DPBF16PS = "kiln_dpbf16ps"
CVTNEPS2BF16 = "kiln_cvtneps2bf16"
CVT_INTRIN = "kiln_cvt_16_bf16"
_DPBF16PS_LLVM = f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define linkonce_odr <16 x float> @{DPBF16PS}(<16 x float> %acc, <16 x i32> %pairs, <16 x i32> %weights) alwaysinline {{
  %a = bitcast <16 x i32> %pairs to <32 x bfloat>
  %b = bitcast <16 x i32> %weights to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %a, <32 x bfloat> %b)
  ret <16 x float> %r
}}
define linkonce_odr <16 x i16> @{CVTNEPS2BF16}(<16 x float> %x) alwaysinline {{
  %b = fptrunc <16 x float> %x to <16 x bfloat>
  %r = bitcast <16 x bfloat> %b to <16 x i16>
  ret <16 x i16> %r
}}
"""


def _register_bf16_intrin() -> None:
    """Register Kiln's ``vdpbf16ps`` intrinsic once (TVM 0.27 ships none for AVX512-BF16)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(BF16_INTRIN, allow_missing=True) is not None:
        return

    # TVMScript: the annotations are buffer declarations, not types (hence the type: ignores)
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((2,), "bfloat16", offset_factor=2), b: T.Buffer((16, 2), "bfloat16", offset_factor=2),  # type: ignore[valid-type]
             c: T.Buffer((16,), "float32", offset_factor=1, scope="global")) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:16], a[0:2], b[0:16, 0:2])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "float32") * T.cast(b[vi, vk], "float32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((2,), "bfloat16", offset_factor=2), b: T.Buffer((16, 2), "bfloat16", offset_factor=2),  # type: ignore[valid-type]
             c: T.Buffer((16,), "float32", offset_factor=1, scope="global")) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:16], a[0:2], b[0:16, 0:2])
            T.writes(c[0:16])
            # the bf16 pairs read as int32 words: no bf16 expression for the legalizers to widen
            pair = T.decl_buffer((1,), "int32", data=a.data, elem_offset=a.elem_offset // 2)
            pairs = T.decl_buffer((16,), "int32", data=b.data, elem_offset=b.elem_offset // 2)
            c[T.ramp(T.int32(0), 1, 16)] = T.call_extern(
                "float32x16", DPBF16PS, c.vload([0], dtype="float32x16"), T.broadcast(pair[0], 16),
                pairs.vload([0], dtype="int32x16"))

    TensorIntrin.register(BF16_INTRIN, desc, impl)

    @T.prim_func(s_tir=True)
    def cvt_desc(a: T.Buffer((16,), "float32", offset_factor=1), b: T.Buffer((16,), "bfloat16", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(a[0:16])
            T.writes(b[0:16])
            for i in T.serial(0, 16):
                with T.sblock("cast"):
                    vi = T.axis.remap("S", [i])
                    b[vi] = T.Cast("bfloat16", a[vi])

    @T.prim_func(s_tir=True)
    def cvt_impl(a: T.Buffer((16,), "float32", offset_factor=1), b: T.Buffer((16,), "bfloat16", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(a[0:16])
            T.writes(b[0:16])
            # the bf16 result stored as int16 words: nothing for the legalizers to rewrite
            words = T.decl_buffer((16,), "int16", data=b.data, elem_offset=b.elem_offset)
            words[T.ramp(T.int32(0), 1, 16)] = T.call_extern("int16x16", CVTNEPS2BF16, a.vload([0], dtype="float32x16"))

    TensorIntrin.register(CVT_INTRIN, cvt_desc, cvt_impl)


def _tile(height: int, width: int, channels: int, vector: VectorUnit) -> tuple[int, int, int]:
    """(vectors of 16 channels, rh, rw): the register tile the fp32 throughput model scores best."""
    best: tuple[float, int, int, int] | None = None
    for n_vectors in (2, 1):
        if channels % (n_vectors * BF16_BLOCK_OC):
            continue
        limit = max(1, register_budget(vector, n_vectors) // n_vectors)
        rw = pick_factor(width, limit)
        rh = pick_factor(height, max(1, limit // rw))
        score = tile_rate(rh * rw, n_vectors, n_vectors * BF16_BLOCK_OC)
        if best is None or score > best[0]:
            best = (score, n_vectors, rh, rw)
    assert best is not None  # channels are a multiple of the block (checked by the caller)
    return best[1], best[2], best[3]


def schedule_bf16_conv(func: tirx.PrimFunc, vector: VectorUnit) -> tirx.PrimFunc | None:
    """The ``vdpbf16ps`` schedule of a fused bf16 x bf16 -> fp32 NHWC convolution kernel, or None."""
    matched = match_nhwc_conv(func, ("bfloat16", "bfloat16", "float32"))
    if matched is None:
        return None
    sch, block, extents = matched
    stmt = sch.get(block)
    _, height, width, channels, _, _, in_channels = extents
    if channels % BF16_BLOCK_OC or in_channels % BF16_BLOCK_IC:
        return None
    _register_bf16_intrin()
    n_vectors, rh, rw = _tile(height, width, channels, vector)

    # an unpadded input (1x1 and other convolutions without padding) is read where it lies: the
    # identity copy TVM's legalisation makes of it would be a pass over memory of its own
    inline_copies(sch, sch.get_child_blocks(sch.get_sblock("root")), block)
    # a padded bf16 input stays materialised (vdpbf16ps broadcasts 4 bytes of it), in parallel
    parallelize_anchor_inputs(sch, block)
    # weights [kh, kw, ic, oc] -> [oc/16, kh, kw, ic/2, 16, 2], re-packed once at compile time
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1),
                         lambda kh, kw, ic, oc: (oc // BF16_BLOCK_OC, kh, kw, ic // BF16_BLOCK_IC,
                                                 oc % BF16_BLOCK_OC, ic % BF16_BLOCK_IC))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)

    # "global": a small global buffer stays on the stack (registers after LLVM); a "local" one was a
    # workspace allocated and freed per tile (ADR 0057); the intrinsic describes its accumulator so
    write_back = sch.cache_write(block, 0, "global")
    # the epilogue up to its last step; a final bf16 cast (the next convolution's input) is rounded apart
    cast = inline_epilogues(sch, block, write_back, keep=_writes_bf16_cast)

    n, h, w, oc, kh, kw, ic = sch.get_loops(block)
    ho, hi = sch.split(h, [None, rh])
    wo, wi = sch.split(w, [None, rw])
    oco, ocv, oci = sch.split(oc, [None, n_vectors, BF16_BLOCK_OC])
    ico, ici = sch.split(ic, [None, BF16_BLOCK_IC])
    reads_with_channels = [stmt.reads[1]]
    if channel_tiles_outermost(stmt, reads_with_channels, channels // (n_vectors * BF16_BLOCK_OC),
                                (height // rh) * (width // rw)):
        outer = [n, oco, ho, wo]
    else:
        outer = [n, ho, wo, oco]
    sch.reorder(*outer, kh, kw, ico, hi, wi, ocv, oci, ici)
    fused = sch.fuse(*outer)
    sch.reverse_compute_at(write_back, fused)
    wb_loops = sch.get_loops(write_back)[1:]
    if wb_loops:
        sch.vectorize(wb_loops[-1])
    if cast is not None:
        _cast_per_pixel(sch, cast, wb_loops[-2] if len(wb_loops) > 1 else fused)
    else:
        _slice_in_tile(sch, write_back, fused)
    sch.parallel(fused)
    sch.annotate(fused, "pragma_import_llvm", _DPBF16PS_LLVM)
    sch.decompose_reduction(block, kh)
    for loop in (hi, wi, ocv):
        sch.unroll(loop)
    sch.tensorize(oci, BF16_INTRIN)
    parallelize_serial_root_blocks(sch)
    result: tirx.PrimFunc = sch.mod["main"]
    return result


def _writes_bf16_cast(sch: Any, blk: Any) -> bool:
    """Whether ``blk`` is the epilogue's last step: the fp32 -> bf16 cast that writes the kernel's output."""
    value = getattr(sch.get(blk).body, "value", None)
    return isinstance(value, tirx.Cast) and str(value.ty) == "bfloat16" and \
        type(value.value).__name__ in ("BufferLoad", "TensorLoad") and writes_output(sch, blk)


def _cast_per_pixel(sch: Any, cast: Any, pixel_loop: Any) -> None:
    """The epilogue's bf16 rounding as one ``vcvtneps2bf16`` per 16 channels, computed per output pixel
    (the fp32 epilogue of one pixel stays in registers) in place of the legaliser's integer rounding."""
    try:
        sch.reverse_compute_at(cast, pixel_loop)
    except Exception:  # the cast then stays a vectorised pass of its own (parallelize_serial_root_blocks)
        return
    _, lanes = sch.split(sch.get_loops(cast)[-1], [None, BF16_BLOCK_OC])
    try:
        sch.tensorize(lanes, CVT_INTRIN)
    except Exception:  # the legaliser's rounding, vectorised
        sch.vectorize(lanes)


def _slice_in_tile(sch: Any, write_back: Any, tile: Any) -> None:
    """Compute each tile's part of the slice that drops the padded channels from the tile's accumulators,
    instead of writing the whole padded result and slicing it in a pass of its own."""
    if slice_at_tile(sch, write_back, tile) is None:
        return
    # the slice reads the accumulators: no padded result in memory at all (else it reads the
    # tile's write-back, still in cache)
    with contextlib.suppress(Exception):
        sch.compute_inline(write_back)


def schedule_bf16_group_matmul(func: tirx.PrimFunc, vector: VectorUnit) -> tirx.PrimFunc | None:
    """The ``vdpbf16ps`` schedule of a grouped pointwise bf16 x bf16 -> fp32 convolution (ShuffleNet's 1x1
    layers: a matmul batched over the group axis, ``SplitGroupedConv``), or None when it does not fit.

    Weights [groups, in, out] re-packed to [groups, out/16, in/2, 16, 2]; the register tile (pixels x 1-2
    vectors of one group's channels) from the same throughput model as the convolutions, pixels as a row."""
    matched = match_group_matmul(func, ("bfloat16", "bfloat16", "float32"))
    if matched is None:
        return None
    sch, block, extents = matched
    pixels, _, _, channels, in_channels = extents
    if channels % BF16_BLOCK_OC or in_channels % BF16_BLOCK_IC:
        return None
    _register_bf16_intrin()
    n_vectors, _, rp = _tile(1, pixels, channels, vector)
    parallelize_anchor_inputs(sch, block)  # the bf16 cast of the input, if it was fused in, stays materialised
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1),
                         lambda g, k, oc: (g, oc // BF16_BLOCK_OC, k // BF16_BLOCK_IC, oc % BF16_BLOCK_OC,
                                           k % BF16_BLOCK_IC))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    write_back = sch.cache_write(block, 0, "global")  # on the stack, as the conv's (ADR 0057)
    inline_epilogues(sch, block, write_back)
    p, g, one, oc, k = sch.get_loops(block)
    po, pi = sch.split(p, [None, rp])
    oco, ocv, oci = sch.split(oc, [None, n_vectors, BF16_BLOCK_OC])
    ko, ki = sch.split(k, [None, BF16_BLOCK_IC])
    # pixel tiles outside channel tiles: one group's weights (at most 136 x 144 bf16) stay in L1/L2
    sch.reorder(g, po, one, oco, ko, pi, ocv, oci, ki)
    fused = sch.fuse(g, po, one, oco)
    sch.reverse_compute_at(write_back, fused)
    wb_loops = sch.get_loops(write_back)[1:]
    if wb_loops:
        sch.vectorize(wb_loops[-1])
    # the slice of the padded channels stays a pass of its own here: computed from the tiles (as the
    # convolutions do) it ran ShuffleNet's 68-of-80-channel layer 1.8x slower (masked tail vectors)
    sch.parallel(fused)
    sch.annotate(fused, "pragma_import_llvm", _DPBF16PS_LLVM)
    sch.decompose_reduction(block, ko)
    for loop in (pi, ocv):
        sch.unroll(loop)
    sch.tensorize(oci, BF16_INTRIN)
    parallelize_serial_root_blocks(sch)
    result: tirx.PrimFunc = sch.mod["main"]
    return result


@tvm.transform.module_pass(opt_level=0, name="KilnBF16ConvSchedule")
class BF16ConvSchedule:
    """Schedule every unscheduled bf16 x bf16 -> fp32 convolution kernel with ``vdpbf16ps`` (AVX512-BF16)."""

    def __init__(self, vector: VectorUnit) -> None:
        self.vector = vector
        self.scheduled: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_each(mod, lambda f: schedule_bf16_conv(f, self.vector) or schedule_bf16_group_matmul(f, self.vector),
                             self.scheduled, "bf16")
