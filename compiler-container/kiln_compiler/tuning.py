"""Budgeted MetaSchedule tuning and a shared tuning database (local dir or S3 prefix).

Work in progress: the API below is stable; internals are being filled in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TuningConfig:
    """A tuning budget: a number of trials, a time budget in seconds, or both."""

    trials: int | None = None
    seconds: float | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> TuningConfig | None:
        """Parse ``CompilerOptions["tuning"]``: ``{"trials": N}`` and/or ``{"minutes": M}``."""
        if not options:
            return None
        spec = options.get("tuning", options)
        if not isinstance(spec, dict):
            raise ValueError("tuning must be an object: {'trials': N} or {'minutes': M}")
        trials = spec.get("trials")
        minutes = spec.get("minutes")
        if trials is None and minutes is None:
            return None
        if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 0):
            raise ValueError("tuning.trials must be a non-negative integer")
        if minutes is not None and (not isinstance(minutes, int | float) or isinstance(minutes, bool) or minutes < 0):
            raise ValueError("tuning.minutes must be a non-negative number")
        return cls(trials=trials, seconds=None if minutes is None else float(minutes) * 60.0)


class TuningDatabase:
    """Tuning records (MetaSchedule JSON database) in a local directory or an S3 prefix."""

    def __init__(self, location: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None):
        self.location = str(location)
        self.local_dir = Path(cache_dir or location)
        self.local_dir.mkdir(parents=True, exist_ok=True)

    @property
    def workload_path(self) -> Path:
        return self.local_dir / "database_workload.json"

    @property
    def tuning_record_path(self) -> Path:
        return self.local_dir / "database_tuning_record.json"

    def open(self) -> Any:
        """The MetaSchedule JSONDatabase over the local files."""
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(
            path_workload=str(self.workload_path),
            path_tuning_record=str(self.tuning_record_path),
            allow_missing=True,
        )


def tune_and_apply(
    mod: Any, target: Any, *, database: TuningDatabase, tuning: TuningConfig | None, deadline: float | None
) -> tuple[Any, dict[str, int]]:
    """Placeholder: apply records only (tuning lands next)."""
    from tvm import relax

    with database.open():
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    reused = sum(1 for _, f in mod.functions_items() if getattr(f, "attrs", None) and "tirx.is_scheduled" in f.attrs)
    return mod, {"tuned": 0, "reused": reused}
