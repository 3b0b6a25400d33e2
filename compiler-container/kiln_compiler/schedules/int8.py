"""u8 x s8 -> s32 convolutions on AVX512-VNNI: ``vpdpbusd`` by tensorization (16 x 4 dot products).

The NHWC/HWIO convolution (``kiln_compiler.graph``) is blocked as 16 output channels x 4 input
channels: the weights are re-packed at compile time to ``[oc/16, kh, kw, ic/4, 16, 4]`` (a layout
rewrite folded like the fp32 kernels' weights), and each step of the reduction is one ``vpdpbusd``:
four input bytes broadcast to 16 lanes against a 64-byte weight block, accumulated into 16 s32.
A tile holds ``rw`` output pixels of a row, one accumulator register each; the requantizing
epilogue is inlined into the tile's write-back. Kernels that do not fit (channels not multiples of
16 / 4, no VNNI) keep Kiln's default schedule.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import tvm
from tvm import tirx

from ..graph.quantized import VNNI, IntegerKernels
from .cpu import inline_epilogues
from .tir import (
    match_group_matmul,
    match_nhwc_conv,
    parallelize_anchor_inputs,
    parallelize_serial_root_blocks,
    same_block,
    schedule_each,
    writes_output,
)

log = logging.getLogger(__name__)

VNNI_INTRIN = "kiln_dot_16x4_vnni"


def _register_vnni_intrin() -> None:
    """Register Kiln's ``vpdpbusd`` intrinsic once.

    Not TVM's ``dot_16x4_vnni``: it calls ``llvm.x86.avx512.vpdpbusd.512`` with ``<16 x i32>``
    operands, which the LLVM in the 0.27 wheel rejects (it declares them ``<64 x i8>``); and
    importing ``tvm.s_tir.tensor_intrin`` registers every CUDA intrinsic too (30-100 s)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is not None:
        return

    # TVMScript: the annotations are buffer declarations, not types (hence the type: ignores)
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_INTRIN, desc, impl)


def _pick_divisor(extent: int, limit: int) -> int:
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def _inline_epilogue_producers(sch: Any, block: Any) -> None:
    """Inline the elementwise producers of the epilogue only (a residual operand's dequantize and view): left
    at the root, they stop the epilogue's inlining at the residual add (or run as passes of their own)."""
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if same_block(sch, blk, block) or writes_output(sch, blk):
            continue
        if any(same_block(sch, c, block) for c in sch.get_consumers(blk)):
            # a zero-width pad (a 1x1 convolution's input copy) is read in place; a real pad stays
            if type(getattr(sch.get(blk).body, "value", None)).__name__ in ("BufferLoad", "TensorLoad"):
                try:
                    sch.compute_inline(blk)
                except Exception:  # the copy then stays materialised
                    continue
            continue
        if any(same_block(sch, p, block) for p in sch.get_producers(blk)):
            continue  # the epilogue itself: inlined into the tile's write-back below
        try:
            sch.compute_inline(blk)
        except Exception:  # a reduction or non-injective block stays where it is
            continue


def schedule_integer_conv(func: tirx.PrimFunc, kernels: IntegerKernels, intrin: str,
                          register: Callable[[], None]) -> tirx.PrimFunc | None:
    """The schedule of a fused integer NHWC convolution kernel whose operands are ``kernels``' (VNNI's u8 x s8,
    AVX2's s16 x s16): a tile of up to ``kernels.pixels`` pixels of a row x one ``kernels.channels`` block, each
    step of ``kernels.steps`` input channels one ``intrin``; None when the kernel does not fit."""
    matched = match_nhwc_conv(func, (kernels.activations, kernels.weights, "int32"))
    if matched is None:
        return None
    sch, block, extents = matched
    _, _, width, channels, _, _, in_channels = extents
    lanes, step = kernels.channels, kernels.steps
    if channels % lanes or in_channels % step:
        return None
    register()
    _inline_epilogue_producers(sch, block)
    # the padded (AVX2: widened) input stays materialised (each step broadcasts one pixel's step of it), in parallel
    parallelize_anchor_inputs(sch, block)
    # weights [kh, kw, ic, oc] -> [oc/lanes, kh, kw, ic/step, lanes, step], re-packed once at compile time
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1),
                         lambda kh, kw, ic, oc: (oc // lanes, kh, kw, ic // step, oc % lanes, ic % step))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)

    # "global": the intrinsic describes its accumulator in the global scope
    write_back = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, write_back)

    n, h, w, oc, kh, kw, ic = sch.get_loops(block)
    rw = _pick_divisor(width, kernels.pixels)
    wo, wi = sch.split(w, [None, rw])
    oco, oci = sch.split(oc, [None, lanes])
    ico, ici = sch.split(ic, [None, step])
    sch.reorder(n, h, wo, oco, kh, kw, ico, wi, oci, ici)
    return _vnni_nest(sch, block, write_back, sch.fuse(n, h, wo, oco), kh, wi, oci, intrin)


def schedule_vnni_conv(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The VNNI schedule of a fused u8 x s8 -> s32 NHWC convolution kernel, or None when it does not fit."""
    return schedule_integer_conv(func, VNNI, VNNI_INTRIN, _register_vnni_intrin)


def schedule_vnni_group_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The VNNI schedule of a grouped pointwise u8 x s8 -> s32 convolution (ShuffleNet's 1x1 layers, a
    batched matmul over the group axis), or None when it does not fit (out % 16, in % 4).

    Weights [groups, in, out] re-packed to [groups, out/16, in/4, 16, 4]; a tile of up to 16 pixels x 16
    channels of one group, one ``vpdpbusd`` per 4 input channels and pixel."""
    matched = match_group_matmul(func, ("uint8", "int8", "int32"))
    if matched is None:
        return None
    sch, block, extents = matched
    pixels, _, _, channels, in_channels = extents
    if channels % 16 or in_channels % 4:
        return None
    _register_vnni_intrin()
    _inline_epilogue_producers(sch, block)  # a residual add's operand (ADR 0051)
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1), lambda g, k, oc: (g, oc // 16, k // 4, oc % 16, k % 4))
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    write_back = sch.cache_write(block, 0, "global")
    inline_epilogues(sch, block, write_back)
    p, g, one, oc, k = sch.get_loops(block)
    rp = _pick_divisor(pixels, VNNI.pixels)
    po, pi = sch.split(p, [None, rp])
    oco, oci = sch.split(oc, [None, 16])
    ko, ki = sch.split(k, [None, 4])
    sch.reorder(g, po, one, oco, ko, pi, oci, ki)
    return _vnni_nest(sch, block, write_back, sch.fuse(g, po, one, oco), ko, pi, oci)


def _vnni_nest(sch: Any, block: Any, write_back: Any, outer: Any, reduction: Any, pixels: Any,
               channels: Any, intrin: str = VNNI_INTRIN) -> tirx.PrimFunc:
    """The common end of a VNNI schedule: write-back of each ``outer`` tile (vectorised), ``outer``
    parallel, the accumulator initialised above ``reduction``, the ``pixels`` loop unrolled and the
    16-channel ``channels`` loop tensorized with ``vpdpbusd`` (or with ``intrin``: sdot's, int8_arm.py)."""
    sch.reverse_compute_at(write_back, outer)
    wb_loops = sch.get_loops(write_back)[1:]
    if wb_loops:
        sch.vectorize(wb_loops[-1])
    _sliced_epilogue_at_tile(sch, write_back, outer)
    sch.parallel(outer)
    sch.decompose_reduction(block, reduction)
    sch.unroll(pixels)
    sch.tensorize(channels, intrin)
    parallelize_serial_root_blocks(sch)
    result: tirx.PrimFunc = sch.mod["main"]
    return result


def _sliced_epilogue_at_tile(sch: Any, write_back: Any, outer: Any) -> None:
    """The rest of the epilogue after a slice (the wider stem's extra columns, the classifier's padded
    channels), computed per tile right after the tile's write-back: left at the root it ran as a separate
    pass over the whole s32 output (SqueezeNet's stem: 0.92 ms, 62 GFLOP/s)."""
    consumers = sch.get_consumers(write_back)
    if len(consumers) != 1:
        return
    rest = consumers[0]
    while not writes_output(sch, rest):  # a slice that only copies: read in place by what follows it
        following = sch.get_consumers(rest)
        if len(following) != 1:
            return
        try:
            sch.compute_inline(rest)
        except Exception:  # not a plain copy: the chain stays at the root
            return
        rest = following[0]
    if sch.get_consumers(rest):
        return
    try:
        sch.reverse_compute_at(rest, outer)
    except Exception:  # the region does not map onto the tile: it stays a pass at the root
        return
    with contextlib.suppress(Exception):  # the write-back's own part (the bias) read in the same loop
        sch.compute_inline(write_back)
    loops = sch.get_loops(rest)[1:]
    if loops:
        sch.vectorize(loops[-1])


@tvm.transform.module_pass(opt_level=0, name="KilnVNNIConvSchedule")
class VNNIConvSchedule:
    """Schedule every unscheduled u8 x s8 -> s32 convolution kernel with ``vpdpbusd`` (AVX512-VNNI targets)."""

    def __init__(self) -> None:
        self.scheduled: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_each(mod, lambda f: schedule_vnni_conv(f) or schedule_vnni_group_matmul(f), self.scheduled, "VNNI")
