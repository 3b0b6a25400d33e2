"""Kiln's parallel launcher (kiln_parallel.c, ADR 0032): in every Linux artifact, used by kiln-runtime."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln import runtime
from kiln_compiler.backends.tvm import parallel_object

from tests.compiler.conftest import compile_artifact, small_cnn


class GroupEnv(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]


LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(GroupEnv), ctypes.c_void_p)


def launcher(tmp_path: Path) -> ctypes.CDLL:
    """kiln_parallel.c as the compiler builds it (parallel_object), linked alone into a fresh library:
    each test gets its own copy, so its own thread pool."""
    lib = tmp_path / "libkiln_parallel.so"
    subprocess.run(["g++", "-shared", "-pthread", "-o", str(lib), str(parallel_object("g++", tmp_path))], check=True)
    loaded = ctypes.CDLL(str(lib))
    loaded.kiln_parallel_launch.argtypes = [LAMBDA, ctypes.c_void_p, ctypes.c_int]
    return loaded


@pytest.mark.parametrize("num_task", [0, 1, 7, 64])
def test_every_chunk_runs_once_and_the_caller_takes_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         num_task: int) -> None:
    # GIVEN the launcher with 3 threads
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    lib = launcher(tmp_path)
    calls: list[tuple[int, int, int]] = []

    @LAMBDA
    def task(task_id: int, env: ctypes._Pointer[GroupEnv], _: int) -> int:
        calls.append((task_id, env.contents.num_task, threading.get_ident()))
        return 0

    # WHEN a loop is launched (0 = let the launcher choose the chunk count), twice
    assert lib.kiln_parallel_launch(task, None, num_task) == 0
    first = list(calls)
    assert lib.kiln_parallel_launch(task, None, num_task) == 0
    # THEN every chunk id ran exactly once per launch, each told the same chunk count
    expected = num_task or 3 * 4  # 4 chunks per thread when the launcher chooses
    assert sorted(c[0] for c in first) == list(range(expected))
    assert {c[1] for c in first} == {expected}
    assert sorted(c[0] for c in calls[len(first):]) == list(range(expected))
    assert lib.kiln_parallel_threads() == 3
    # AND a launch of one chunk runs on the calling thread
    if num_task == 1:
        assert {c[2] for c in calls} == {threading.get_ident()}


def test_a_failing_chunk_fails_the_launch_and_nested_launches_run_serially(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the launcher with 2 threads
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    lib = launcher(tmp_path)
    inner: list[int] = []

    @LAMBDA
    def inner_task(task_id: int, env: ctypes._Pointer[GroupEnv], _: int) -> int:
        inner.append(task_id)
        return 0

    @LAMBDA
    def outer_task(task_id: int, env: ctypes._Pointer[GroupEnv], _: int) -> int:
        # a kernel's chunk that launches a loop itself (TVM does not nest, but nothing may deadlock)
        return int(lib.kiln_parallel_launch(inner_task, None, 3))

    @LAMBDA
    def failing(task_id: int, env: ctypes._Pointer[GroupEnv], _: int) -> int:
        return -1 if task_id == 5 else 0

    # WHEN one chunk of a loop fails  THEN the launch reports it, as TVM's launcher does
    assert lib.kiln_parallel_launch(failing, None, 8) == -1
    # WHEN chunks launch loops of their own  THEN every inner chunk runs, serially inside its chunk
    assert lib.kiln_parallel_launch(outer_task, None, 4) == 0
    assert sorted(inner) == sorted(list(range(3)) * 4)
    # AND the pool still works afterwards
    assert lib.kiln_parallel_launch(failing, None, 4) == 0


@pytest.mark.skipif(sys.platform != "linux" or not runtime.host_machine().startswith("x86"),
                    reason="runs an x86-64 Linux artifact")
def test_artifacts_run_their_loops_on_kilns_launcher_with_the_same_results(tmp_path: Path) -> None:
    # GIVEN a small CNN compiled for ml_c4 (its convolutions have parallel loops)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(small_cnn(), str(model_dir / "model.onnx"))
    artifact = compile_artifact(model_dir, "ONNX", "ml_c4", tmp_path)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    # WHEN kiln-runtime loads it by default, and with TVM's own thread pool
    ours = runtime.load(artifact)
    tvms = runtime.load(artifact, parallel="tvm")
    # THEN the default runs on Kiln's launcher, the other on TVM's pool
    assert ours._impl.kiln_parallel is True
    assert tvms._impl.kiln_parallel is False
    # AND both give the same outputs, which are the model's (ONNX Runtime)
    out = ours.run({"input": x})[0]
    np.testing.assert_array_equal(out, tvms.run({"input": x})[0])
    reference = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out, reference.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
    for _ in range(20):  # repeated calls: generations of the pool do not mix
        np.testing.assert_array_equal(ours.run({"input": x})[0], out)
