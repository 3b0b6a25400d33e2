"""s16 x s16 -> s32 convolutions on AVX2: ``vpmaddwd`` by tensorization (8 x 2 dot products), ADR 0059.

On x86 targets without AVX512-VNNI the graph (``graph.quantized.AVX2``) gives QDQ convolutions s16 operands:
the u8 input widened in the kernel (materialised once per call, in parallel, with its zero-point
padding), the s8 weights widened at compile time and re-packed to ``[oc/8, kh, kw, ic/2, 8, 2]``.
Each reduction step is one ``vpmaddwd`` (two input values broadcast as one i32 to 8 lanes, against a
32-byte weight block: 8 exact s32 sums of 2 products) and one ``vpaddd`` into the accumulator; no
product saturates (``vpmaddubsw``'s u8 x s8 pair sums do). The tile, the accumulator and the
epilogue are the VNNI schedule's (``schedules/int8.py``).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from ..graph.quantized import AVX2
from .cpu import inline_epilogues
from .int8 import _inline_epilogue_producers, _pick_divisor, _vnni_nest
from .tir import match_group_matmul, match_nhwc_conv, parallelize_anchor_inputs, schedule_each

PMADDWD_INTRIN = "kiln_dot_8x2_pmaddwd"
_DTYPES = (AVX2.activations, AVX2.weights, "int32")
_LANES, _STEP = AVX2.channels, AVX2.steps


def _register_pmaddwd_intrin() -> None:
    """Register Kiln's ``vpmaddwd`` intrinsic once: ``c[i] += a[0] * b[i, 0] + a[1] * b[i, 1]`` for 8 lanes."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(PMADDWD_INTRIN, allow_missing=True) is not None:
        return

    # TVMScript: the annotations are buffer declarations, not types (hence the type: ignores)
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((2,), "int16", offset_factor=1), b: T.Buffer((8, 2), "int16", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((8,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((2,), "int16", offset_factor=1), b: T.Buffer((8, 2), "int16", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((8,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            a_i32 = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(a_i32, 8), dtype="int16x16"),
                b.vload([0, 0], dtype="int16x16"),
                dtype="int32x8",
            )

    TensorIntrin.register(PMADDWD_INTRIN, desc, impl)


def schedule_pmaddwd_conv(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The AVX2 schedule of a fused s16 x s16 -> s32 NHWC convolution kernel, or None when it does not fit."""
    matched = match_nhwc_conv(func, _DTYPES)
    if matched is None:
        return None
    sch, block, extents = matched
    _, _, width, channels, _, _, in_channels = extents
    if channels % _LANES or in_channels % _STEP:
        return None
    _register_pmaddwd_intrin()
    _inline_epilogue_producers(sch, block)
    # the widened (and padded) input stays materialised (vpmaddwd broadcasts 2 x s16 of it), in parallel
    parallelize_anchor_inputs(sch, block)
    # weights [kh, kw, ic, oc] -> [oc/8, kh, kw, ic/2, 8, 2], re-packed once at compile time
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1),
                         lambda kh, kw, ic, oc: (oc // _LANES, kh, kw, ic // _STEP, oc % _LANES, ic % _STEP))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    write_back = sch.cache_write(block, 0, "global")  # the intrinsic's accumulator is in the global scope
    inline_epilogues(sch, block, write_back)

    n, h, w, oc, kh, kw, ic = sch.get_loops(block)
    rw = _pick_divisor(width, AVX2.pixels)
    wo, wi = sch.split(w, [None, rw])
    oco, oci = sch.split(oc, [None, _LANES])
    ico, ici = sch.split(ic, [None, _STEP])
    sch.reorder(n, h, wo, oco, kh, kw, ico, wi, oci, ici)
    return _vnni_nest(sch, block, write_back, sch.fuse(n, h, wo, oco), kh, wi, oci, PMADDWD_INTRIN)


def schedule_pmaddwd_group_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The AVX2 schedule of a grouped pointwise s16 x s16 -> s32 convolution (ShuffleNet's 1x1 layers, a
    batched matmul over the group axis), or None when it does not fit (out % 8, in % 2).

    Weights [groups, in, out] re-packed to [groups, out/8, in/2, 8, 2]; a tile of up to 14 pixels x 8
    channels of one group."""
    matched = match_group_matmul(func, _DTYPES)
    if matched is None:
        return None
    sch, block, extents = matched
    pixels, _, _, channels, in_channels = extents
    if channels % _LANES or in_channels % _STEP:
        return None
    _register_pmaddwd_intrin()
    _inline_epilogue_producers(sch, block)
    parallelize_anchor_inputs(sch, block)
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1),
                         lambda g, k, oc: (g, oc // _LANES, k // _STEP, oc % _LANES, k % _STEP))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    write_back = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, write_back)
    p, g, one, oc, k = sch.get_loops(block)
    rp = _pick_divisor(pixels, AVX2.pixels)
    po, pi = sch.split(p, [None, rp])
    oco, oci = sch.split(oc, [None, _LANES])
    ko, ki = sch.split(k, [None, _STEP])
    sch.reorder(g, po, one, oco, ko, pi, oci, ki)
    return _vnni_nest(sch, block, write_back, sch.fuse(g, po, one, oco), ko, pi, oci, PMADDWD_INTRIN)


@tvm.transform.module_pass(opt_level=0, name="KilnPmaddwdConvSchedule")
class PmaddwdConvSchedule:
    """Schedule every unscheduled s16 x s16 -> s32 convolution kernel with ``vpmaddwd`` (AVX2 targets)."""

    def __init__(self) -> None:
        self.scheduled: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_each(mod, lambda f: schedule_pmaddwd_conv(f) or schedule_pmaddwd_group_matmul(f),
                             self.scheduled, "AVX2 int16")
