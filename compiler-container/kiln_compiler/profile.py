"""The profile of a built artifact: how fast it runs, and how much memory and how many threads it takes.

After packaging, the job adapter loads the artifact with ``kiln.runtime`` (exactly as a user would)
in a child process, runs it on random inputs a few times after warm-up and reports median and p90
latency, the child's peak resident memory and the runtime's worker threads. A child process keeps
the compiler's own memory out of the figure and a crashing artifact out of the job; its runs are
bounded in count and time, within what MaxRuntimeInSeconds leaves.

A job is profiled only where the measurement means something: on a runner of the target's own
hardware (``KILN_PROFILE=runner``, deployed) or on any host that can run the artifact
(``KILN_PROFILE=host``, local mode). Otherwise the profile says why not (``measured: false``).

``python -m kiln_compiler.profile ARTIFACT_DIR '{"warmup": 3, "runs": 20, "budget_s": 10}'`` is the
child; it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kiln.catalog import Runner, Target

PROFILE_VERSION = 1
MIN_BUDGET_S = 2.0  # below this much time left, a profile would be noise: say so instead


class ProfileMode(StrEnum):
    """Where a job's artifact may be measured (``KILN_PROFILE``)."""

    RUNNER = "runner"  # only on a runner of the target's hardware (deployed runners)
    HOST = "host"  # on any host that can run the artifact (local mode: the host is what it is)
    OFF = "off"


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile is taken: warm-up runs, measured runs, and the time they may take at most."""

    mode: ProfileMode = ProfileMode.RUNNER
    warmup: int = 3
    runs: int = 20
    budget_s: float = 15.0  # measured runs stop when this is spent (at least one run is made)
    timeout_s: float = 120.0  # the child process (load + warm-up + runs) is killed after this

    @classmethod
    def from_env(cls, env: dict[str, str] | Any) -> ProfileSettings:
        """``KILN_PROFILE`` (runner | host | off) and ``KILN_PROFILE_RUNS`` from the container environment."""
        raw = (env.get("KILN_PROFILE") or ProfileMode.RUNNER.value).lower()
        try:
            mode = ProfileMode(raw)
        except ValueError:
            raise ValueError(f"KILN_PROFILE must be one of {[m.value for m in ProfileMode]}, not {raw!r}") from None
        runs = int(env.get("KILN_PROFILE_RUNS") or cls.runs)
        return cls(mode=mode, runs=max(1, min(runs, 1000)))


def not_measured(reason: str) -> dict[str, Any]:
    """The profile of a job whose artifact could not be measured, with the reason."""
    return {"version": PROFILE_VERSION, "measured": False, "reason": reason}


def run_measuring_child(args: list[str], timeout: float) -> dict[str, Any] | str:
    """The last JSON object ``python -m <args>`` printed, or why there is none ("timeout", or the last
    line of its stderr / its exit code): measurements run in a child so a crashing artifact never fails a job."""
    try:
        done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return "timeout"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def why_not(target: Target, manifest: dict[str, Any], settings: ProfileSettings, runner: str | None,
            seconds_left: float | None) -> str | None:
    """Why this job's artifact cannot be profiled here, or None when it can."""
    from kiln import runtime

    if settings.mode is ProfileMode.OFF:
        return "profiling is turned off in this deployment (KILN_PROFILE=off)"
    if settings.mode is ProfileMode.RUNNER:
        reason = _runner_mismatch(target, runner)
        if reason:
            return reason
    try:
        runtime.check_host(manifest)
    except runtime.IncompatibleHostError as exc:
        return f"this runner cannot run the artifact: {exc}"
    if seconds_left is not None and seconds_left < MIN_BUDGET_S:
        return f"only {max(seconds_left, 0):.0f} s of MaxRuntimeInSeconds were left after the build"
    return None


def _runner_mismatch(target: Target, runner: str | None) -> str | None:
    """Why timings on ``runner`` would not be the target's (None when the runner is its hardware)."""
    known = {str(r): r for r in Runner}
    if runner not in known:
        return f"the runner this job ran on is not known ({runner or 'KILN_RUNNER unset'}), so no measurement was taken"
    ran_on = known[runner]
    if target.measurable_on(ran_on):
        return None
    if not ran_on.on_target_hardware:
        return (f"{target.name} is a cross or edge target: it was built on the generic '{runner}' runner "
                f"(no choice of CPU), not on {target.name} hardware, so no measurement was possible")
    return (f"the '{runner}' runner ({ran_on.spec.instance_family} instances) is not {target.name} hardware "
            f"({target.instance_family}), so no measurement was possible")


def host_description(runner: str | None) -> dict[str, Any]:
    """Where a profile was taken: machine, CPU model, logical CPUs and the runner kind."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                cpu = value.strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu or platform.processor(), "cpus": os.cpu_count() or 1,
            "runner": runner or "unknown"}


def profile_artifact(root: Path, settings: ProfileSettings, *, runner: str | None,
                     seconds_left: float | None = None) -> dict[str, Any]:
    """Measure the artifact unpacked (or staged) at ``root`` in a child process; a profile dict.

    A failing or overrunning child gives ``measured: false`` with the reason: a profile never fails a job."""
    budget = settings.budget_s
    timeout = settings.timeout_s
    if seconds_left is not None:  # leave half of what is left for upload and reporting
        budget = max(min(budget, seconds_left / 4), 0.5)
        timeout = max(min(timeout, seconds_left / 2), MIN_BUDGET_S)
    spec = {"warmup": settings.warmup, "runs": settings.runs, "budget_s": budget}
    measured = run_measuring_child(["kiln_compiler.profile", str(root), json.dumps(spec)], timeout)
    if measured == "timeout":
        return not_measured(f"the profile did not finish within {timeout:.0f} s (load, warm-up and runs)")
    if isinstance(measured, str):
        return not_measured(f"the artifact could not be run for its profile: {measured}")
    return {"version": PROFILE_VERSION, "measured": True, **measured, "host": host_description(runner)}


def _peak_rss_mib() -> float:
    """This process's peak resident set. Linux: VmHWM, because ru_maxrss survives execve and would report
    the compiler's peak that forked this child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _worker_threads(model: Any) -> int:
    """Threads the runtime computes with: TVM's thread pool size, or TL2cgen's nthread."""
    if model.manifest.get("runtime") == "tl2cgen":
        return int(os.environ.get("TVM_NUM_THREADS") or 0) or os.cpu_count() or 1
    import tvm_ffi

    num_threads = tvm_ffi.get_global_func("runtime.NumThreads", allow_missing=True)
    if num_threads is not None:
        return int(num_threads())
    return int(os.environ.get("TVM_NUM_THREADS") or 0) or os.cpu_count() or 1


def random_feeds(model: Any, seed: int = 0) -> dict[str, Any]:
    """Seeded random inputs for a loaded artifact's input specs (a dynamic dimension at 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        shape = tuple(d if d >= 0 else 1 for d in spec.shape)  # a dynamic dimension runs at 1
        if np.dtype(spec.dtype).kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def measure(root: Path, *, warmup: int, runs: int, budget_s: float) -> dict[str, Any]:
    """Load the artifact at ``root``, warm it up, then time up to ``runs`` runs within ``budget_s``."""
    from kiln import runtime

    rss_before = _peak_rss_mib()
    model = runtime.load(root)
    feeds = random_feeds(model)
    for _ in range(warmup):
        model.run(feeds)
    times: list[float] = []
    stop_at = time.perf_counter() + budget_s
    while len(times) < runs and (not times or time.perf_counter() < stop_at):
        start = time.perf_counter()
        model.run(feeds)
        times.append((time.perf_counter() - start) * 1000)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {
        "median_ms": round(statistics.median(times), 4),
        "p90_ms": round(p90, 4),
        "min_ms": round(ordered[0], 4),
        "runs": len(times),
        "warmup_runs": warmup,
        "peak_rss_mib": _peak_rss_mib(),
        "baseline_rss_mib": rss_before,  # the interpreter and numpy, before the runtime library and model
        "threads": _worker_threads(model),
        "inputs": {spec.name: [d if d >= 0 else 1 for d in spec.shape] for spec in model.inputs},
    }


def main(argv: list[str]) -> int:
    """The child: ``ARTIFACT_DIR SPEC_JSON`` -> one JSON line on stdout."""
    root, spec = Path(argv[0]), json.loads(argv[1])
    result = measure(root, warmup=int(spec["warmup"]), runs=int(spec["runs"]), budget_s=float(spec["budget_s"]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
