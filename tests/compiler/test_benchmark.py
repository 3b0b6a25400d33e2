"""kiln.benchmark: Kiln and its peers, each in its own process, timed in interleaved blocks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from kiln.benchmark import RunnerSpec, kiln_runner, peer_runners, runner_pool

from tests.compiler.conftest import compile_artifact
from tests.conftest import tiny_onnx_model


@pytest.fixture(scope="module")
def tiny_model_and_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tests.conftest's tiny network as an ONNX file and compiled by Kiln for ml_c4 (runs on every x86 host)."""
    out = tmp_path_factory.mktemp("bench")
    model_dir = out / "model"
    model_dir.mkdir()
    onnx.save(tiny_onnx_model(), str(model_dir / "model.onnx"))
    return model_dir / "model.onnx", compile_artifact(model_dir, "ONNX", "ml_c4", out)


def reference(x: np.ndarray) -> np.ndarray:
    """The tiny network in numpy: relu(x @ W + b), weights as tests.conftest makes them."""
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in tiny_onnx_model().graph.initializer}
    return np.maximum(x @ weights["W"] + weights["b"], 0)


def test_each_runner_runs_in_its_own_process_and_all_agree(tiny_model_and_artifact: tuple[Path, Path]) -> None:
    # GIVEN the tiny network as a Kiln artifact and as an ONNX file for both peers
    model, artifact = tiny_model_and_artifact
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    specs = [kiln_runner(artifact, threads=1), *peer_runners(model, threads=1)]
    # WHEN a runner pool starts them
    with runner_pool(specs, {"x": x}) as pool:
        pids = {name: runner.pid for name, runner in pool.runners.items()}
        outputs = {name: pool.outputs(name)[0] for name in pool.runners}
        samples = pool.interleaved_samples(rounds=3, per_round=4)
        medians = pool.interleaved_medians(rounds=2, per_round=2)
        processes = [psutil.Process(pid) for pid in pids.values()]
    # THEN there is one process per runner, none of them this one, each with the runner's thread setting
    assert set(pids) == {"Kiln", "ONNX Runtime", "OpenVINO"}
    assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    # AND each computes the network (the pool's feeds reached every runner)
    for name, output in outputs.items():
        np.testing.assert_allclose(output, reference(x), rtol=1e-5, atol=1e-5, err_msg=name)
    # AND every runner got rounds x per_round timed calls, all positive; medians for every runner
    assert {name: len(times) for name, times in samples.items()} == {name: 12 for name in pids}
    assert all(ms > 0 for times in samples.values() for ms in times)
    assert set(medians) == set(pids) and all(ms > 0 for ms in medians.values())
    # AND no runner process outlives the pool
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive


def test_a_runner_that_cannot_load_fails_the_pool_with_its_name(tmp_path: Path) -> None:
    # GIVEN a peer pointed at a file that is not an ONNX model
    bad = tmp_path / "not-a-model.onnx"
    bad.write_bytes(b"not a model")
    spec = RunnerSpec("ONNX Runtime", "onnxruntime", str(bad), 1)
    # WHEN the pool starts it  THEN the error names the runner instead of hanging
    with pytest.raises(RuntimeError, match="runner 'ONNX Runtime' ended"), \
            runner_pool([spec], {"x": np.zeros((1, 8), np.float32)}):
        pass


def test_a_tolerant_pool_drops_a_runner_that_cannot_load_and_times_the_rest(
        tiny_model_and_artifact: tuple[Path, Path], tmp_path: Path) -> None:
    # GIVEN the tiny network for ONNX Runtime, and a peer pointed at a file that is not a model
    model, _ = tiny_model_and_artifact
    bad = tmp_path / "not-a-model.onnx"
    bad.write_bytes(b"not a model")
    specs = [RunnerSpec("good", "onnxruntime", str(model), 1), RunnerSpec("bad", "onnxruntime", str(bad), 1)]
    # WHEN a pool that tolerates failures starts both and times them
    with runner_pool(specs, {"x": np.zeros((1, 8), np.float32)}, tolerate_failures=True) as pool:
        medians = pool.interleaved_medians(rounds=2, per_round=2)
        failed = dict(pool.failed)
    # THEN the broken one is reported with its name and exit, the other one timed
    assert set(medians) == {"good"}
    assert list(failed) == ["bad"] and "runner 'bad' ended (exit" in failed["bad"]
