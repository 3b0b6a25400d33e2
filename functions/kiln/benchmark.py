"""Timing Kiln against its peers: one definition for ``make bench``, ``make demo`` and ``kiln bench``.

The peers are what a user would run instead of Kiln on an x86 CPU: ONNX Runtime (CPU execution
provider) and OpenVINO (CPU plugin, fp32 forced with ``INFERENCE_PRECISION_HINT`` so it does not
silently run bf16, ``PERFORMANCE_HINT=LATENCY``), each with the same thread count as Kiln.

Each runner lives in its own process (``python -m kiln.benchmark``), as each would in a deployment:
in one process, ONNX Runtime's and OpenVINO's worker threads keep spinning after a call and TVM's
thread pool then waits for cores they hold (measured: SqueezeNet 5 ms alone, 44 ms when its calls
alternate with ONNX Runtime's in one process). The runners are timed in interleaved blocks, the
order rotated each round, so noise from the host hits every runner alike; before each block the
parent waits until every runner process is idle, so no runner's spinning threads take the cores
of the one being timed. onnxruntime and openvino are imported in a runner's process only
(benchmark dependencies, requirements/dev.txt; never runtime ones).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

Feeds = Mapping[str, np.ndarray]
RunnerKind = Literal["kiln", "onnxruntime", "openvino"]
PEER_NAMES: dict[RunnerKind, str] = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
# A runner process counts as idle when it used less CPU than this over one poll interval.
_IDLE_CPU_S, _IDLE_POLL_S, _IDLE_WAIT_MAX_S = 0.001, 0.02, 2.0


@dataclass(frozen=True)
class RunnerSpec:
    """What one runner process loads: a Kiln artifact, or a peer runtime on an ONNX model file."""

    name: str
    kind: RunnerKind
    path: str  # the artifact (.tar.gz or directory) for "kiln", the .onnx file for a peer
    threads: int
    # OpenVINO's INFERENCE_PRECISION_HINT: "f32" (what the fp32 rows compare against) or "default", the
    # precision OpenVINO picks by itself (bf16 on CPUs that have it: what a user gets out of the box).
    precision: Literal["f32", "default"] = "f32"


def kiln_runner(artifact: str | os.PathLike[str], threads: int, name: str = "Kiln") -> RunnerSpec:
    """A Kiln artifact, run through kiln-runtime with ``threads`` kernel threads."""
    return RunnerSpec(name, "kiln", str(artifact), threads)


def peer_runners(model: str | os.PathLike[str], threads: int) -> list[RunnerSpec]:
    """Every peer the bench measures, on an ONNX model file, each with ``threads`` threads (fp32 OpenVINO)."""
    return [RunnerSpec(name, kind, str(model), threads) for kind, name in PEER_NAMES.items()]


def openvino_default_runner(model: str | os.PathLike[str], threads: int) -> RunnerSpec:
    """OpenVINO as a user gets it out of the box: the precision its CPU plugin picks (bf16 where native)."""
    return RunnerSpec("OpenVINO default", "openvino", str(model), threads, precision="default")


def _load(spec: RunnerSpec) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """Build the runner in this (the runner's own) process."""
    if spec.kind == "kiln":
        from kiln import runtime

        model = runtime.load(spec.path)
        return model.run
    if spec.kind == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        session = ort.InferenceSession(spec.path, options, providers=["CPUExecutionProvider"])
        return lambda feeds: list(session.run(None, feeds))
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": spec.threads}
    if spec.precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(spec.path), "CPU", config)
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer(feeds)
        return [np.asarray(results[output]) for output in compiled.outputs]

    return run


def _serve(commands: IO[str], replies: IO[str]) -> None:
    """A runner process: load the spec given on the first line, then answer commands, one JSON line each."""
    first = json.loads(commands.readline())
    spec = RunnerSpec(**first["spec"])
    with np.load(first["feeds"]) as data:
        feeds = {name: data[name] for name in data.files}
    run = _load(spec)
    run(feeds)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in commands:
        command = json.loads(line)
        if "time" in command:
            run(feeds)  # untimed: caches and thread pools warm again after the other runners' blocks
            samples = []
            for _ in range(int(command["time"])):
                start = time.perf_counter()
                run(feeds)
                samples.append((time.perf_counter() - start) * 1000)
            reply: dict[str, Any] = {"ms": samples}
        else:
            np.savez(command["outputs"], *run(feeds))
            reply = {"outputs": command["outputs"]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class RunnerProcess:
    """One runner in its own process, driven over its stdin/stdout."""

    def __init__(self, spec: RunnerSpec, feeds_path: Path, workdir: Path) -> None:
        self.spec = spec
        self._workdir = workdir
        env = {**os.environ, "TVM_NUM_THREADS": str(spec.threads), "OMP_NUM_THREADS": str(spec.threads)}
        self._process = subprocess.Popen([sys.executable, "-m", "kiln.benchmark"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, text=True)
        self._send({"spec": asdict(spec), "feeds": str(feeds_path)})

    def _send(self, message: dict[str, Any]) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()

    def _reply(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"runner {self.spec.name!r} ended (exit {self._process.wait()}); see its stderr")
        reply: dict[str, Any] = json.loads(line)
        return reply

    @property
    def pid(self) -> int:
        """The runner's process id."""
        return self._process.pid

    def wait_ready(self) -> None:
        """Block until the runner has loaded its model and run it once."""
        self._reply()

    def time(self, calls: int) -> list[float]:
        """Milliseconds of ``calls`` back-to-back calls (after one untimed call)."""
        self._send({"time": calls})
        return [float(ms) for ms in self._reply()["ms"]]

    def outputs(self) -> list[np.ndarray]:
        """The runner's outputs on the feeds."""
        path = self._workdir / f"{self._process.pid}-outputs.npz"
        self._send({"outputs": str(path)})
        self._reply()
        with np.load(path) as data:
            return [data[f"arr_{i}"] for i in range(len(data.files))]

    def cpu_seconds(self) -> float:
        """CPU time the runner process has used, all its threads (0.0 when it cannot be read)."""
        try:
            import psutil

            times = psutil.Process(self._process.pid).cpu_times()
            return float(times.user + times.system)
        except Exception:  # psutil missing or the process gone: waiting falls back to the poll cap
            return 0.0

    def close(self) -> None:
        """End the runner process."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


class RunnerPool:
    """Runner processes on the same feeds, timed against each other in interleaved blocks.

    With ``tolerate_failures``, a runner whose process dies (a peer crashing on a model) is dropped and
    its reason kept in ``failed``; otherwise its death raises ``RuntimeError`` naming it."""

    def __init__(self, runners: Sequence[RunnerProcess], failed: Mapping[str, str] | None = None,
                 tolerate_failures: bool = False) -> None:
        self.runners = {runner.spec.name: runner for runner in runners}
        self.failed: dict[str, str] = dict(failed or {})
        self._tolerate = tolerate_failures

    def _drop(self, name: str, exc: RuntimeError) -> None:
        if not self._tolerate:
            raise exc
        self.failed[name] = str(exc)
        self.runners.pop(name).close()

    def outputs(self, name: str) -> list[np.ndarray]:
        """The outputs of runner ``name`` on the pool's feeds."""
        return self.runners[name].outputs()

    def wait_idle(self) -> None:
        """Wait (at most 2 s) until no runner process uses CPU: spinning worker threads have gone to sleep."""
        deadline = time.monotonic() + _IDLE_WAIT_MAX_S
        before = [r.cpu_seconds() for r in self.runners.values()]
        while time.monotonic() < deadline:
            time.sleep(_IDLE_POLL_S)
            after = [r.cpu_seconds() for r in self.runners.values()]
            if all(a - b < _IDLE_CPU_S for a, b in zip(after, before, strict=True)):
                return
            before = after

    def interleaved_samples(self, rounds: int, per_round: int = 5) -> dict[str, list[float]]:
        """Milliseconds of every timed call of each runner: ``rounds`` rounds of ``per_round`` calls per runner,
        the order of the runners rotated each round and every runner process idle before each block."""
        names = list(self.runners)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if name not in self.runners:
                    continue
                self.wait_idle()
                try:
                    samples[name] += self.runners[name].time(per_round)
                except RuntimeError as exc:
                    self._drop(name, exc)
        return {name: times for name, times in samples.items() if name in self.runners}

    def interleaved_medians(self, rounds: int, per_round: int = 5) -> dict[str, float]:
        """Median ms of each runner over :meth:`interleaved_samples`."""
        return {name: statistics.median(times) for name, times in self.interleaved_samples(rounds, per_round).items()}


@contextmanager
def runner_pool(specs: Sequence[RunnerSpec], feeds: Feeds, *, tolerate_failures: bool = False) -> Iterator[RunnerPool]:
    """Start one process per runner (loaded in parallel), all on ``feeds``; ended on exit."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        workdir = Path(tmp)
        feeds_path = workdir / "feeds.npz"
        arrays: dict[str, Any] = {name: np.asarray(value) for name, value in feeds.items()}
        np.savez(feeds_path, **arrays)
        started: list[RunnerProcess] = []
        ready: list[RunnerProcess] = []
        failed: dict[str, str] = {}
        try:
            for spec in specs:
                started.append(RunnerProcess(spec, feeds_path, workdir))
            for runner in started:
                try:
                    runner.wait_ready()
                    ready.append(runner)
                except RuntimeError as exc:
                    if not tolerate_failures:
                        raise
                    failed[runner.spec.name] = str(exc)
            yield RunnerPool(ready, failed, tolerate_failures)
        finally:
            for runner in started:
                runner.close()


def median_ms(run: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``run()`` in milliseconds (one runner, in this process)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def faster_peer(medians: Mapping[str, float], peer_names: list[str]) -> tuple[str, float]:
    """The fastest of ``peer_names`` in ``medians``: (name, ms)."""
    name = min(peer_names, key=lambda n: medians[n])
    return name, medians[name]


if __name__ == "__main__":
    # Library output on stdout would corrupt the replies: they go to a private copy of stdout, fd 1 to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin, replies)
