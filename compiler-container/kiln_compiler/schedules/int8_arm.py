"""s8 x s8 -> s32 convolutions on aarch64 with dotprod (Graviton2+): ``sdot`` by tensorization (4 x 4 dot products).

The graph (``graph.quantized.SDOT``) gives these kernels s8 activations (u8 ones shifted by -128, the
compensation folded into the per-channel correction) and s8 weights. As on VNNI (``int8.py``, whose parts
this reuses) the weights are re-packed at compile time, to ``[oc/c, kh, kw, ic/4, c, 4]`` for a tile of
``c = 4 * cb`` output channels; one ``sdot`` (``llvm.aarch64.neon.sdot.v4i32.v16i8``) multiplies four input
bytes of a pixel, broadcast to the four 32-bit lanes, with a 16-byte block of 4 channels x 4 input channels
and adds into 4 s32 accumulators. A tile is ``cb`` such blocks x ``rw`` pixels, sized for NEON's 32 q
registers; the requantizing epilogue is inlined into its write-back. Numerics and generated code are tested
under qemu; no ARM host has timed it (ADR 0060).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from .cpu import inline_epilogues
from .int8 import _inline_epilogue_producers, _pick_divisor, _vnni_nest
from .tir import match_group_matmul, match_nhwc_conv, parallelize_anchor_inputs, schedule_each

SDOT_INTRIN = "kiln_dot_4x4_sdot"
# s32 accumulators per tile, of the 32 q registers: the rest hold the tile's cb weight blocks and the broadcast input
_ACCUMULATORS = 26
_DTYPES = ("int8", "int8", "int32")


def _register_sdot_intrin() -> None:
    """Register Kiln's ``sdot`` intrinsic once (not TVM's arm_cpu ones: importing ``tvm.s_tir.tensor_intrin``
    registers every CUDA intrinsic too, see int8.py)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(SDOT_INTRIN, allow_missing=True) is not None:
        return

    # TVMScript: the annotations are buffer declarations, not types (hence the type: ignores)
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((4,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((4,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            a_i32 = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                c.vload([0], dtype="int32x4"),
                b.vload([0, 0], dtype="int8x16"),
                T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16"),
                dtype="int32x4",
            )

    TensorIntrin.register(SDOT_INTRIN, desc, impl)


def sdot_tile(pixels: int, blocks: int) -> tuple[int, int]:
    """``(cb, rw)``: 4-channel blocks (a divisor of ``blocks``, at most 4) and pixels (a divisor of ``pixels``)
    of a tile, with at most ``_ACCUMULATORS`` accumulators, the most ``sdot`` per register load (cb x rw
    products for cb weight and rw input loads per step of 4 input channels)."""
    tiles = [(cb, _pick_divisor(pixels, _ACCUMULATORS // cb)) for cb in (4, 3, 2, 1) if blocks % cb == 0]
    return max(tiles, key=lambda t: (t[0] * t[1] / (t[0] + t[1]), t[0]))


def schedule_sdot_conv(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The sdot schedule of a fused s8 x s8 -> s32 NHWC convolution kernel, or None when it does not fit."""
    matched = match_nhwc_conv(func, _DTYPES)
    if matched is None:
        return None
    sch, block, extents = matched
    _, _, width, channels, _, _, in_channels = extents
    if channels % 4 or in_channels % 4:
        return None
    cb, rw = sdot_tile(width, channels // 4)
    _register_sdot_intrin()
    # the shift to s8 inlines into a real pad; a 1x1 convolution's shifted input stays one pass before the tiles
    _inline_epilogue_producers(sch, block)
    parallelize_anchor_inputs(sch, block)
    cached = sch.cache_read(block, 1, "global")
    c = 4 * cb
    sch.transform_layout(block, ("read", 1), lambda kh, kw, ic, oc: (oc // c, kh, kw, ic // 4, oc % c, ic % 4))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    write_back = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, write_back)

    n, h, w, oc, kh, kw, ic = sch.get_loops(block)
    wo, wi = sch.split(w, [None, rw])
    oco, ocb, oci = sch.split(oc, [None, cb, 4])
    ico, ici = sch.split(ic, [None, 4])
    sch.reorder(n, h, wo, oco, kh, kw, ico, wi, ocb, oci, ici)
    sch.unroll(ocb)
    return _vnni_nest(sch, block, write_back, sch.fuse(n, h, wo, oco), kh, wi, oci, SDOT_INTRIN)


def schedule_sdot_group_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The sdot schedule of a grouped pointwise s8 x s8 -> s32 convolution (a batched matmul over the group
    axis, ``SplitGroupedConv``), or None when it does not fit (out % 4, in % 4): weights [groups, in, out]
    re-packed to [groups, out/c, in/4, c, 4]."""
    matched = match_group_matmul(func, _DTYPES)
    if matched is None:
        return None
    sch, block, extents = matched
    pixels, _, _, channels, in_channels = extents
    if channels % 4 or in_channels % 4:
        return None
    cb, rp = sdot_tile(pixels, channels // 4)
    _register_sdot_intrin()
    _inline_epilogue_producers(sch, block)  # a residual add's operand (ADR 0051)
    cached = sch.cache_read(block, 1, "global")
    c = 4 * cb
    sch.transform_layout(block, ("read", 1), lambda g, k, oc: (g, oc // c, k // 4, oc % c, k % 4))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    write_back = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, write_back)
    p, g, one, oc, k = sch.get_loops(block)
    po, pi = sch.split(p, [None, rp])
    oco, ocb, oci = sch.split(oc, [None, cb, 4])
    ko, ki = sch.split(k, [None, 4])
    sch.reorder(g, po, one, oco, ko, pi, ocb, oci, ki)
    sch.unroll(ocb)
    return _vnni_nest(sch, block, write_back, sch.fuse(g, po, one, oco), ko, pi, oci, SDOT_INTRIN)


@tvm.transform.module_pass(opt_level=0, name="KilnSdotConvSchedule")
class SdotConvSchedule:
    """Schedule every unscheduled s8 x s8 -> s32 convolution kernel with ``sdot`` (aarch64 dotprod targets)."""

    def __init__(self) -> None:
        self.scheduled: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_each(mod, lambda f: schedule_sdot_conv(f) or schedule_sdot_group_matmul(f), self.scheduled,
                             "sdot")
