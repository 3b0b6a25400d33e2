"""What `kiln compile` shows: host target matching, progress lines, fixes for failure reasons, the display."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
from kiln import isa, progress
from kiln.catalog import TargetCatalog
from kiln.hints import suggest_fix
from kiln.host import NoHostTargetError, matching_target, target_isa_label
from kiln.terminal import JobFollower, Snapshot, summary
from rich.console import Console


def _flags(mtriple: str, mcpu: str, *extra: str) -> set[str]:
    """The cpuinfo flags of a CPU of that model (kiln.isa's table), plus ``extra``."""
    return set(isa.cpu_features(mtriple, mcpu).features) | set(extra)


@pytest.mark.parametrize(("machine", "flags", "expected", "label"), [
    # widest vectors win, then the compute family: a Zen 4 / Skylake-SP host gets ml_c5
    ("x86_64", _flags("x86_64-linux-gnu", "skylake-avx512", "avx512_vnni", "sha_ni"), "ml_c5", "AVX-512"),
    ("x86_64", _flags("x86_64-linux-gnu", "haswell"), "ml_c4", "AVX2"),
    ("aarch64", _flags("aarch64-linux-gnu", "neoverse-n1"), "ml_c6g", "NEON"),
])
def test_host_matches_the_widest_catalog_target_its_cpu_runs(machine: str, flags: set[str], expected: str,
                                                             label: str) -> None:
    # GIVEN the catalog and a host's machine and CPU flags  WHEN matched  THEN the widest runnable cloud target
    target = matching_target(TargetCatalog(), machine, flags)
    assert target.name == expected
    assert set(target.isa) <= flags
    assert target_isa_label(target) == label


def test_host_without_a_matching_target_is_told_what_to_pass() -> None:
    # GIVEN an x86 CPU without AVX2 (no cloud target runs there)  WHEN matched  THEN a clear error
    with pytest.raises(NoHostTargetError, match=r"pass --target-device with one of: .*ml_c4"):
        matching_target(TargetCatalog(), "x86_64", _flags("x86_64-linux-gnu", "x86-64", "avx"))


def test_progress_lines_round_trip_and_stage_lines_are_read() -> None:
    # GIVEN a progress line as the tuner writes it, and the job timer's stage lines
    out = io.StringIO()
    progress.emit("tuning", out, phase="search", done=3, total=20, stop_at=123.0)
    # WHEN parsed THEN each is an event; anything else is not
    assert progress.parse(out.getvalue()) == {"event": "tuning", "phase": "search", "done": 3, "total": 20,
                                              "stop_at": 123.0}
    assert progress.parse("2026-12-01 10:00:00 INFO kiln_compiler.job: stage build: start") == {
        "event": "stage", "stage": "build", "state": "start"}
    assert progress.parse("INFO kiln_compiler.job: stage build: 12.50s")["seconds"] == 12.5  # type: ignore[index]
    assert progress.parse("INFO tvm: building stage 3 of the pipeline") is None
    assert progress.parse("kiln-progress {not json") is None


@pytest.mark.parametrize(("reason", "fix"), [
    ("ClientError: the compilation exceeded MaxRuntimeInSeconds (60 s)", "Raise StoppingCondition.MaxRuntimeInSeconds"),
    ("ClientError: InputConfiguration: no ONNX model file found in the archive", "Fix the model archive"),
    ("ClientError: InputConfiguration: DataInputConfig is missing input 'data'", "DataInputConfig with every input"),
    ("ClientError: OutputConfiguration: CompilerOptions give an invalid target", "Fix OutputConfig"),
    ("ServerError: S3 upload failed", "Kiln failed, not your input"),
])
def test_every_failure_reason_gets_what_to_do(reason: str, fix: str) -> None:
    # GIVEN a FailureReason  WHEN a fix is suggested  THEN it is the one for that kind of failure
    assert fix in (suggest_fix(reason) or "")


def test_no_fix_without_a_reason() -> None:
    assert suggest_fix("") is None and suggest_fix(None) is None


def test_live_display_shows_stage_and_tuning_progress_with_time_left() -> None:
    # GIVEN a job in its build stage, tuning kernel 3 of 20 with 150 s left in the budget
    now = time.time()
    state = progress.Progress()
    state.feed("stage download: start", now - 9)
    state.feed("stage download: 0.40s", now - 8)
    state.feed("stage build: start", now - 8)
    state.feed(progress.PREFIX + '{"event": "tuning", "phase": "search", "done": 3, "total": 20, '
               f'"stop_at": {now + 150}}}', now)
    # WHEN rendered
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(Snapshot("INPROGRESS", 65, state, now).render())
    text = console.export_text()
    # THEN a person reads the status, the stage with its time, and the tuning progress
    assert "status INPROGRESS  1:05" in text
    assert "stage build  8 s" in text
    assert "3/20 kernels, searching schedules, 2:30 left in the budget" in text
    assert "done: download 0.4 s" in text


def test_plain_output_prints_stages_before_the_final_status(tmp_path: Path) -> None:
    # GIVEN a job whose log already holds every stage when its status turns COMPLETED
    log = tmp_path / "job.log"
    statuses = iter(["STARTING", "INPROGRESS", "COMPLETED"])

    def describe() -> dict[str, Any]:
        status = next(statuses)
        if status == "COMPLETED":
            log.write_text("INFO x: stage build: start\nINFO x: stage build: 1.00s\nINFO x: stage upload: 0.10s\n"
                           "INFO kiln.runners: task token already closed: InvalidToken\n")
        return {"CompilationJobStatus": status}

    out = io.StringIO()
    # WHEN followed on a non-terminal console
    job = JobFollower(Console(file=out, width=120), describe, log, poll=0).follow(time.time())
    # THEN the status lines and stage lines come in order, stages before COMPLETED, no other log line
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert job["CompilationJobStatus"] == "COMPLETED"
    assert lines == ["status STARTING", "status INPROGRESS", "  stage build: start", "  stage build: 1.00 s",
                     "  stage upload: 0.10 s", "status COMPLETED"]


@pytest.mark.parametrize(("profile", "latency", "rows"), [
    # a measured profile is the artifact's latency: the caller times nothing itself
    ({"measured": True, "median_ms": 4.46, "p90_ms": 7.64, "runs": 20, "peak_rss_mib": 263, "threads": 2,
      "host": {"runner": "local", "cpu": "AMD EPYC"}}, None,
     ["profile   4.46 ms median, 7.64 ms p90 over 20 runs, peak 263 MiB, 2 threads (runner local, AMD EPYC)"]),
    # no profile measured: the caller's figure beside the reason, or why there is none
    ({"measured": False, "reason": "not run on this host"}, (9.44, ""),
     ["latency   9.44 ms (median, batch as compiled, this host)", "profile   not measured: not run on this host"]),
    (None, (None, "this host lacks avx512f"), ["latency   not measured here: this host lacks avx512f"]),
])
def test_summary_shows_the_latency_figure_that_applies(tmp_path: Path, profile: dict[str, Any] | None,
                                                       latency: tuple[float | None, str] | None,
                                                       rows: list[str]) -> None:
    # GIVEN a completed job with or without a measured profile, and its artifact
    artifact = tmp_path / "model-ml_c5.tar.gz"
    artifact.write_bytes(b"x" * 10)
    job = {"OutputConfig": {"TargetDevice": "ml_c5"}, "Kiln": {"Profile": profile} if profile else {}}
    # WHEN the summary is rendered
    out = io.StringIO()
    Console(file=out, width=200).print(summary(job, artifact, None, latency, 12.0))
    # THEN its latency and profile rows are exactly those that apply
    shown = [line.rstrip() for line in out.getvalue().splitlines() if line.startswith(("latency", "profile"))]
    assert shown == rows
