"""Typed settings of local mode: how ``kiln serve`` shares this host between the API and compilers.

In AWS the compilers run on Fargate/Batch capacity of their own; on one host they share the CPUs
with the API, so local mode bounds how many run at once and runs them below the API's priority.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Compiler processes run this much below the API's CPU priority by default (nice 10: a runnable
# API thread gets ~9x a compiler thread's share of the CPU).
DEFAULT_COMPILER_NICENESS = 10


class LocalSettings(BaseModel):
    """Local mode's compute: compiler slots, their CPU priority, API workers, shutdown grace."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Compiler processes running at once (None: the CPUs this process may use); the rest wait as
    # pending tasks do in AWS, their wait counting against MaxPendingTimeInSeconds.
    max_compilers: int | None = Field(default=None, ge=1)
    # How far below the API's priority compiler processes (and their children: tuning and measuring
    # processes) run, as nice(1) counts; 0 runs them at the API's priority.
    compiler_niceness: int = Field(default=DEFAULT_COMPILER_NICENESS, ge=0, le=19)
    # Where compiler processes take their CPU under Linux's scheduler autogroups (ADR 0029):
    # "own": each in a session of its own, a share beside the API's as on a machine of its own (nice
    # then orders it below the API only where autogroups are off); "api": in kiln serve's session,
    # below the API (the API wins; compilers progress with what it leaves, slowly while it is busy).
    compiler_cpu_share: Literal["own", "api"] = "own"
    # Processes answering the API beside the embedded stack's (0: the stack's process answers it).
    api_workers: int = Field(default=4, ge=0)
    # On stop, compiler processes get SIGTERM, then SIGKILL after this many seconds.
    stop_grace_seconds: float = Field(default=5.0, gt=0, le=60)
