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
from .int8 import schedule_integer_conv
from .tir import schedule_each

PMADDWD_INTRIN = "kiln_dot_8x2_pmaddwd"


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
    """The AVX2 schedule of a fused s16 x s16 -> s32 NHWC convolution kernel, or None when it does not fit: the
    VNNI schedule's tile with ``vpmaddwd`` (8 channels x 2 input channels a step, up to 14 pixels). The graph
    makes no s16 grouped matmuls (``AVX2.group_matmuls``): there is no grouped schedule here."""
    return schedule_integer_conv(func, AVX2, PMADDWD_INTRIN, _register_pmaddwd_intrin)


@tvm.transform.module_pass(opt_level=0, name="KilnPmaddwdConvSchedule")
class PmaddwdConvSchedule:
    """Schedule every unscheduled s16 x s16 -> s32 convolution kernel with ``vpmaddwd`` (AVX2 targets)."""

    def __init__(self) -> None:
        self.scheduled: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_each(mod, schedule_pmaddwd_conv, self.scheduled, "AVX2 int16")
