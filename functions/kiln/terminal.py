"""What ``kiln compile`` shows while a job runs and when it ends.

A terminal gets one live display (rich): status, the current stage with its elapsed time, tuning
progress (kernels done / total, time left in the budget). Anything else (a pipe, CI, a test) gets
one plain line per change. Either way the job ends with a short summary, or the FailureReason and
what to do about it. The follower reads only DescribeCompilationJob and the compiler's log.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from kiln.hints import suggest_fix
from kiln.isa import vector_isa_name
from kiln.progress import Progress

TERMINAL = ("COMPLETED", "FAILED", "STOPPED")
_STATUS_STYLE = {"COMPLETED": "green", "FAILED": "red", "STOPPED": "yellow", "STOPPING": "yellow"}


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Snapshot:
    """One moment of a job as the follower sees it."""

    status: str
    elapsed: float
    progress: Progress
    now: float

    def render(self) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=2)
        grid.add_column()
        style = _STATUS_STYLE.get(self.status, "cyan")
        grid.add_row(Spinner("dots", style=style), Text.assemble(("status ", "dim"), (self.status, f"bold {style}"),
                                                                 (f"  {_clock(self.elapsed)}", "dim")))
        p = self.progress
        if p.stage is not None:
            since = self.now - (p.stage_started or self.now)
            grid.add_row("", Text.assemble(("stage ", "dim"), (p.stage, "bold"), (f"  {since:.0f} s", "dim")))
        if p.tuning is not None and p.tuning.get("phase") not in ("end",):
            grid.add_row("", self._tuning_row(p.tuning))
        if p.stages_done:
            done = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in p.stages_done.items())
            grid.add_row("", Text(f"done: {done}", style="dim"))
        return grid

    def _tuning_row(self, tuning: dict[str, Any]) -> RenderableType:
        done, total = int(tuning.get("done", 0)), int(tuning.get("total", 0)) or 1
        what = {"tiles": "measuring Kiln's tiles", "search": "searching schedules"}.get(str(tuning.get("phase")),
                                                                                       "tuning")
        row = Table.grid(padding=(0, 1))
        row.add_row(Text("tuning", style="dim"), ProgressBar(total=total, completed=done, width=24),
                    Text(f"{done}/{total} kernels, {what}{_time_left(tuning, self.now)}"))
        return row


def _time_left(tuning: dict[str, Any], now: float) -> str:
    stop_at = tuning.get("stop_at")
    return f", {_clock(float(stop_at) - now)} left in the budget" if stop_at else ""


class JobFollower:
    """Follows one job until it ends, showing it on ``console``."""

    def __init__(self, console: Console, describe: Callable[[], dict[str, Any]], log_path: Path, *,
                 verbose: bool = False, poll: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self._console, self._describe, self._log_path = console, describe, log_path
        self._verbose, self._poll, self._clock = verbose, poll, clock
        self._offset = 0
        self._partial = ""
        self.progress = Progress()

    def follow(self, started: float) -> dict[str, Any]:
        """Poll until the job is terminal; returns its last DescribeCompilationJob."""
        if self._console.is_terminal:
            return self._follow_live(started)
        return self._follow_lines(started)

    def _follow_live(self, started: float) -> dict[str, Any]:
        with Live(console=self._console, refresh_per_second=4, transient=True) as live:
            while True:
                job = self._describe()
                # --verbose: the compiler's log scrolls above the live display
                self._read_log(started, echo=self._verbose)
                status = job["CompilationJobStatus"]
                now = self._clock()
                live.update(Snapshot(status, now - started, self.progress, now).render())
                if status in TERMINAL:
                    return job
                time.sleep(self._poll)

    def _follow_lines(self, started: float) -> dict[str, Any]:
        seen = ""
        while True:
            job = self._describe()
            status = job["CompilationJobStatus"]
            # the log first: every stage line precedes the status that follows it
            self._read_log(started, echo=True)
            if status != seen:
                self._line(started, f"status {status}")
                seen = status
            if status in TERMINAL:
                return job
            time.sleep(self._poll)

    def _line(self, started: float, text: str) -> None:
        self._console.print(f"[{self._clock() - started:6.1f}s] {text}", highlight=False)

    def _read_log(self, started: float, *, echo: bool) -> None:
        if not self._log_path.exists():
            return
        with self._log_path.open("r", errors="replace") as log:
            log.seek(self._offset)
            chunk = log.read()
            self._offset = log.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the rest
        for line in lines:
            event = self.progress.feed(line, self._clock())
            if not echo:
                continue
            if self._verbose:
                self._line(started, f"  | {line}")
            elif event is not None and event["event"] == "stage":
                state = "start" if event["state"] == "start" else f"{event['seconds']:.2f} s"
                self._line(started, f"  stage {event['stage']}: {state}")
            elif event is not None and event["event"] == "tuning" and event.get("phase") in ("tiles", "search"):
                self._line(started, f"  tuning {event['phase']} {event['done']}/{event['total']} kernels"
                                    f"{_time_left(event, self._clock())}")


def read_artifact_manifest(artifact: Path) -> dict[str, Any] | None:
    """The manifest.json of an artifact (.tar.gz), or None when it has none."""
    import json

    try:
        with tarfile.open(artifact, "r:gz") as tar:
            member = tar.extractfile("manifest.json")
            return json.loads(member.read()) if member is not None else None
    except (OSError, KeyError, tarfile.TarError, ValueError):
        return None


def artifact_latency(artifact: Path, repeat: int = 10) -> tuple[float | None, str]:
    """(median ms on random inputs, "") when this host runs the artifact, else (None, why not)."""
    import numpy as np

    from kiln import runtime
    from kiln.benchmark import median_ms

    try:
        model = runtime.load(artifact)
    except runtime.IncompatibleHostError as exc:
        return None, str(exc)
    rng = np.random.default_rng(0)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(spec.dtype) for spec in model.inputs}
    return median_ms(lambda: model.run(feeds), repeat=repeat, warmup=2), ""


def measured_profile(job: dict[str, Any]) -> dict[str, Any] | None:
    """The job record's profile (``Kiln.Profile``) when the compiler measured one, else None."""
    profile = (job.get("Kiln") or {}).get("Profile")
    return profile if profile and profile.get("measured") else None


def summary(job: dict[str, Any], artifact: Path, manifest: dict[str, Any] | None,
            latency: tuple[float | None, str] | None, elapsed: float, target_description: str = "") -> RenderableType:
    """The few lines a user reads when a job completed. ``latency`` (timed by the caller) is shown
    only when given: a measured profile, taken by the compiler in a process of its own, is the
    better figure (the caller's process also runs the embedded stack)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column(overflow="fold")
    size = artifact.stat().st_size
    shown = _relative(artifact)
    table.add_row("artifact", f"{shown}  ({size / 1e6:.1f} MB)" if size >= 100_000 else f"{shown}  ({size} B)")
    target = (manifest or {}).get("target", {})
    name = target.get("name") or job.get("OutputConfig", {}).get("TargetDevice", "")
    table.add_row("target", f"{name}  {target_description}".rstrip())
    features = [str(f) for f in target.get("isa") or []]
    table.add_row("ISA", f"{vector_isa_name(features)}  ({' '.join(features)})" if features else "-")
    tuning = (manifest or {}).get("tuning") or {}
    if tuning:
        table.add_row("kernels", f"{tuning.get('tuned', 0)} tuned, {tuning.get('reused', 0)} reused, "
                                 f"{tuning.get('default', 0)} default schedule")
    if latency is not None:
        ms, why = latency
        table.add_row("latency", f"{ms:.2f} ms (median, batch as compiled, this host)" if ms is not None
                      else f"not measured here: {why}")
    profile = (job.get("Kiln") or {}).get("Profile")
    if profile:
        table.add_row("profile", profile_line(profile))
    return Group(Text.assemble(("COMPLETED", "bold green"), f" in {elapsed:.1f} s"), table)


def profile_line(profile: dict[str, Any]) -> str:
    """The job record's profile (``Kiln.Profile``, taken by the compiler after packaging) in one line."""
    if not profile.get("measured"):
        return f"not measured: {profile.get('reason', 'no reason given')}"
    host = profile.get("host") or {}
    return (f"{profile['median_ms']:.2f} ms median, {profile['p90_ms']:.2f} ms p90 over {profile['runs']} runs, "
            f"peak {profile['peak_rss_mib']:.0f} MiB, {profile['threads']} threads "
            f"(runner {host.get('runner', '?')}, {host.get('cpu') or host.get('machine', '?')})")


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (shorter to read)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def failure(job: dict[str, Any]) -> RenderableType:
    """The FailureReason of an ended job, and what to do about it."""
    status = job["CompilationJobStatus"]
    reason = job.get("FailureReason") or ("stopped by StopCompilationJob" if status == "STOPPED" else "no reason")
    lines: list[RenderableType] = [Text.assemble((status, f"bold {_STATUS_STYLE.get(status, 'red')}"), ": ", reason)]
    fix = suggest_fix(job.get("FailureReason"))
    if fix:
        lines.append(Text.assemble(("what to do: ", "bold"), fix))
    return Group(*lines)
