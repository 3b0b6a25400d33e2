"""Timing Kiln against its peers: one definition for ``make bench``, ``make demo`` and ``kiln bench``.

The peers are what a user would run instead of Kiln on an x86 CPU: ONNX Runtime (CPU execution
provider) and OpenVINO (CPU plugin, fp32 forced with ``INFERENCE_PRECISION_HINT`` so it does not
silently run bf16, ``PERFORMANCE_HINT=LATENCY``), each with the same thread count as Kiln. They are
timed in interleaved rounds, so noise from the host hits every runner alike. onnxruntime and openvino
are imported when a peer is made (benchmark dependencies, requirements/dev.txt; never a runtime one).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Peer:
    """A runtime Kiln is measured against: its name and how to run the model once."""

    name: str
    run: Callable[[Feeds], list[np.ndarray]]


def onnxruntime_peer(model: bytes, threads: int) -> Peer:
    """ONNX Runtime's CPU execution provider with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return Peer("ONNX Runtime", lambda feeds: list(session.run(None, dict(feeds))))


def openvino_peer(model: bytes, threads: int) -> Peer:
    """OpenVINO's CPU plugin: fp32, latency mode, ``threads`` inference threads."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model, b""), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def run(feeds: Feeds) -> list[np.ndarray]:
        results = request.infer(dict(feeds))
        return [np.asarray(results[output]) for output in compiled.outputs]

    return Peer("OpenVINO", run)


PEER_FACTORIES: tuple[Callable[[bytes, int], Peer], ...] = (onnxruntime_peer, openvino_peer)


def peers(model: bytes, threads: int) -> list[Peer]:
    """Every peer the bench measures, for an ONNX model (serialized)."""
    return [factory(model, threads) for factory in PEER_FACTORIES]


def median_ms(run: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``run()`` in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def interleaved_medians(runners: Mapping[str, Callable[[], Any]], rounds: int, per_round: int = 1,
                        warmup: int = 2) -> dict[str, float]:
    """Median ms of each runner, timed round by round (every runner ``per_round`` times per round,
    the order rotated each round) so that host noise falls on all of them alike."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(per_round):
                start = time.perf_counter()
                runners[name]()
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(times) for name, times in samples.items()}


def faster_peer(medians: Mapping[str, float], peer_names: list[str]) -> tuple[str, float]:
    """The fastest of ``peer_names`` in ``medians``: (name, ms)."""
    name = min(peer_names, key=lambda n: medians[n])
    return name, medians[name]
