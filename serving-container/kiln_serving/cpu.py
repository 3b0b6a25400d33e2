"""How many CPUs this container may use: its cgroup quota, bounded by the CPUs it is pinned to."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_cpus(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), in CPUs;
    None when there is none or it cannot be read."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(cgroup: Path = CGROUP) -> int:
    """Threads worth running: the quota rounded up, at most the CPUs this process may run on, at least 1."""
    pinned = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = quota_cpus(cgroup)
    return max(1, min(pinned, math.ceil(quota)) if quota else pinned)
