"""Kiln's default CPU schedules and the tile knobs tuning varies (imports neither tuning nor the pipeline)."""

from __future__ import annotations

from typing import Any

from kiln import isa

from .cpu import DefaultCPUSchedule, default_schedule, schedule_cpu_func
from .knobs import TileKnobs, tile_variants
from .tir import has_root, is_scheduled

__all__ = ["DefaultCPUSchedule", "TileKnobs", "default_schedule", "has_root", "is_scheduled",
           "schedule_cpu_func", "target_cpu", "target_lanes", "tile_variants"]


def target_cpu(target: Any) -> isa.CpuFeatures:
    """The CPU features of an LLVM ``tvm.target.Target`` (from ``kiln.isa``)."""
    attrs = target.attrs
    return isa.cpu_features(str(attrs.get("mtriple", "") or "x86_64-linux-gnu"),
                            str(attrs.get("mcpu", "") or "") or None,
                            [str(a) for a in (attrs.get("mattr", None) or [])])


def target_lanes(target: Any) -> int:
    """fp32 lanes of the target's widest vector register (AVX-512 16, AVX2 8, NEON/SSE 4)."""
    return target_cpu(target).vector_lanes
