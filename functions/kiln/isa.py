"""The one table of CPU knowledge: what an LLVM ``-mcpu``/``-mattr`` lets generated code use.

Feature names are the host's ``/proc/cpuinfo`` flag names (``avx512f``, ``avx512_vnni``,
``asimddp``), so a manifest's feature list is checked against a host by plain set inclusion
(``kiln.runtime.check_host``). Everything that needs CPU features reads them from here: the
catalog (a target's ``isa``), the compiler's effective target (``mcpu``/``mattr`` from
CompilerOptions), the default schedules (vector lanes) and the tuner's "can this host run the
code" check. Pure data: no TVM, no AWS SDK.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Arch(StrEnum):
    """Instruction-set architecture of a target triple."""

    X86_64 = "x86_64"
    X86 = "i686"
    AARCH64 = "aarch64"
    ARMV7 = "armv7l"


# x86 feature groups, cumulative (each level implies the ones before it).
_SSE4 = ("ssse3", "sse4_1", "sse4_2", "popcnt")
_AVX2 = (*_SSE4, "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe")
_AVX512 = (*_AVX2, "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
_AVX512_VNNI = (*_AVX512, "avx512_vnni")
_ICELAKE = (*_AVX512_VNNI, "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq")
_ZEN4 = (*_ICELAKE, "avx512_bf16")
_SAPPHIRE_RAPIDS = (*_ZEN4, "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# aarch64 (cpuinfo "Features"): NEON is asimd; dotprod asimddp; Graviton3 adds SVE, BF16, I8MM.
_NEON = ("asimd",)
_NEOVERSE_N1 = (*_NEON, "asimddp", "asimdhp", "fphp")
_NEOVERSE_V1 = (*_NEOVERSE_N1, "asimdfhm", "sve", "bf16", "i8mm")

# LLVM -mcpu -> cpuinfo features the generated code may use, per architecture.
_X86_MODELS: Mapping[str, tuple[str, ...]] = {
    "x86-64": (), "pentium4": (), "x86-64-v2": _SSE4,
    "haswell": _AVX2, "broadwell": _AVX2, "skylake": _AVX2, "core-avx2": _AVX2, "x86-64-v3": _AVX2,
    "znver1": _AVX2, "znver2": _AVX2, "znver3": _AVX2, "alderlake": (*_AVX2, "avx_vnni"),
    "skylake-avx512": _AVX512, "x86-64-v4": _AVX512, "cascadelake": _AVX512_VNNI,
    "cooperlake": (*_AVX512_VNNI, "avx512_bf16"),
    "icelake-client": _ICELAKE, "icelake-server": _ICELAKE, "tigerlake": _ICELAKE, "rocketlake": _ICELAKE,
    "znver4": _ZEN4, "znver5": (*_ZEN4, "avx_vnni"),
    "sapphirerapids": _SAPPHIRE_RAPIDS, "emeraldrapids": _SAPPHIRE_RAPIDS, "graniterapids": _SAPPHIRE_RAPIDS,
}
# NEON is mandatory on aarch64; the armv7 targets Kiln knows all have it.
_ARM_MODELS: Mapping[str, tuple[str, ...]] = {
    "generic": _NEON, "cortex-a53": _NEON, "cortex-a55": (*_NEON, "asimddp"), "cortex-a57": _NEON,
    "cortex-a72": _NEON, "cortex-a15": _NEON, "cortex-a17": _NEON, "carmel": (*_NEON, "asimddp"),
    "neoverse-n1": _NEOVERSE_N1, "neoverse-v1": _NEOVERSE_V1, "neoverse-n2": (*_NEOVERSE_V1, "sve2"),
    "neoverse-v2": (*_NEOVERSE_V1, "sve2"),
}
CPU_MODELS: Mapping[Arch, Mapping[str, tuple[str, ...]]] = {
    Arch.X86_64: _X86_MODELS, Arch.X86: _X86_MODELS, Arch.AARCH64: _ARM_MODELS, Arch.ARMV7: _ARM_MODELS,
}

# Every feature the table knows (what reports of a host's CPU list).
KNOWN_FEATURES: frozenset[str] = frozenset(f for models in CPU_MODELS.values() for fs in models.values() for f in fs)

# LLVM -mattr names -> cpuinfo names (where they differ, or where a flag implies a vector width).
_MATTR: Mapping[str, str] = {
    "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8",
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "bmi": "bmi1",
    "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "fp16fml": "asimdfhm",
}
# Features that give native bf16 arithmetic with fp32 accumulation (CompilerOptions "precision": "bf16"):
# AVX512-BF16 vdpbf16ps (Cooper Lake, Zen 4, Sapphire Rapids), AMX-BF16 tiles, ARMv8.6 BF16 (Graviton3).
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")
# Features that widen the fp32 vector: the widest present sets the lanes.
_LANES = (("avx512f", 16), ("avx2", 8), ("avx", 8))
# Architectural vector registers: x86-64 16 ymm/xmm (AVX-512 doubles them to 32 zmm), 32-bit x86
# 8; aarch64 NEON 32 q, armv7 NEON 16 q.
_REGISTERS = {Arch.X86_64: 16, Arch.X86: 8, Arch.AARCH64: 32, Arch.ARMV7: 16}


@dataclass(frozen=True)
class VectorUnit:
    """The fp32 vector registers generated code may use: how wide, and how many."""

    lanes: int
    registers: int


# what people call the widest vector extension of a feature set, widest first
_VECTOR_NAMES = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"), ("neon", "NEON"),
                 ("sse4_2", "SSE4.2"))


def vector_isa_name(features: Iterable[str]) -> str:
    """The widest vector extension in ``features`` as people name it (AVX-512, AVX2, NEON, ...), or '-'."""
    have = set(features)
    return next((name for flag, name in _VECTOR_NAMES if flag in have), "-")


@dataclass(frozen=True)
class CpuFeatures:
    """What code generated for one (triple, mcpu, mattr) may use."""

    arch: Arch
    features: frozenset[str]

    @property
    def vector_lanes(self) -> int:
        """fp32 lanes of the widest vector register the code uses (AVX-512 16, AVX2 8, NEON/SSE 4)."""
        return next((lanes for flag, lanes in _LANES if flag in self.features), 4)

    @property
    def vector_unit(self) -> VectorUnit:
        """Lanes and number of the vector registers (AVX-512 16 x 32, AVX2 8 x 16, aarch64 NEON 4 x 32)."""
        registers = _REGISTERS[self.arch]
        if self.arch is Arch.X86_64 and "avx512f" in self.features:
            registers = 32
        return VectorUnit(self.vector_lanes, registers)

    @property
    def native_bf16(self) -> bool:
        """Whether the code may use bf16 dot products with fp32 accumulation (:data:`BF16_FEATURES`)."""
        return any(f in self.features for f in BF16_FEATURES)

    @property
    def runtime_check(self) -> tuple[str, ...]:
        """The features a host must report to run this code, in table order (what manifests list).

        x86 only: on ARM the cpuinfo names differ between kernels and qemu-user does not emulate
        them, so ARM artifacts are checked by machine, not by feature."""
        if self.arch not in (Arch.X86_64, Arch.X86):
            return ()
        order = {f: i for i, f in enumerate(_SAPPHIRE_RAPIDS)}
        return tuple(sorted(self.features, key=lambda f: (order.get(f, len(order)), f)))


class UnknownCpuError(ValueError):
    """An ``mcpu`` this table does not know; its features cannot be vouched for."""


def arch_of(mtriple: str) -> Arch:
    """The architecture of an LLVM target triple."""
    head = mtriple.split("-", 1)[0]
    if head in ("x86_64", "amd64"):
        return Arch.X86_64
    if head in ("i386", "i486", "i586", "i686", "x86"):
        return Arch.X86
    if head in ("aarch64", "arm64"):
        return Arch.AARCH64
    if head.startswith(("armv7", "arm")):
        return Arch.ARMV7
    raise ValueError(f"unknown target triple {mtriple!r}")


def cpu_features(mtriple: str, mcpu: str | None, mattr: Iterable[str] = ()) -> CpuFeatures:
    """Features of code generated for ``mtriple``/``mcpu`` with ``mattr`` (``+f`` adds, ``-f`` removes).

    Raises UnknownCpuError for an mcpu missing from the architecture's table: an artifact's
    manifest must never claim fewer features than its code uses."""
    arch = arch_of(mtriple)
    models = CPU_MODELS[arch]
    name = mcpu or ("generic" if arch in (Arch.AARCH64, Arch.ARMV7) else "x86-64")
    if name not in models:
        raise UnknownCpuError(f"mcpu '{name}' is not a {arch.value} CPU Kiln knows; known: {', '.join(sorted(models))}")
    features = set(models[name])
    for attr in mattr:
        sign, flag = attr[:1], attr[1:]
        flag = _MATTR.get(flag, flag)
        if sign == "+":
            features.add(flag)
        elif sign == "-":
            features.discard(flag)
    return CpuFeatures(arch, frozenset(features))


def target_features(tvm_target: Mapping[str, Any]) -> CpuFeatures:
    """Features of an LLVM target given as a catalog/TVM target dict (``mtriple``, ``mcpu``, ``mattr``)."""
    return cpu_features(str(tvm_target.get("mtriple") or "x86_64-linux-gnu"), tvm_target.get("mcpu") or None,
                        [str(a) for a in tvm_target.get("mattr") or ()])


def host_can_run(features: CpuFeatures, host_arch: str, host_flags: set[str] | None) -> bool:
    """Whether a host (its machine name and cpuinfo flags) can execute code with ``features``."""
    if features.arch.value != host_arch:
        return False
    return host_flags is not None and features.features <= host_flags
