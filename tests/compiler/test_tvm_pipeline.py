"""Default CPU schedules: same numbers as the unscheduled build; every target compiles."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from kiln_compiler.pipeline import compile_relax  # noqa: E402
from kiln_compiler.schedules import target_lanes  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

os.environ.setdefault("TVM_NUM_THREADS", "2")
# AVX2 runs on every x86 host these tests meet (ml_c4-like); tolerance: fp32 reassociation.
HOST = {"kind": "llvm", "mcpu": "haswell"}
RTOL, ATOL = 1e-4, 1e-4


def _run(mod: Any, inputs: list[np.ndarray], default_schedules: bool) -> np.ndarray:
    ex = compile_relax(mod, HOST, default_schedules=default_schedules).executable
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()


def _conv_module(weight: np.ndarray, stride: int, pad: int) -> Any:
    w = relax.const(weight)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, weight.shape[1], 28, 28), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad))
            z = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(np.float32(0.5)))))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(("cout", "cin", "k", "stride", "pad"), [(32, 16, 3, 1, 1), (24, 8, 1, 2, 0), (16, 3, 7, 2, 3)])
def test_conv2d_default_schedule_matches_unscheduled(cout: int, cin: int, k: int, stride: int, pad: int) -> None:
    # GIVEN a conv2d + bias + relu with constant weights
    rng = np.random.default_rng(0)
    mod = _conv_module(rng.standard_normal((cout, cin, k, k)).astype("float32"), stride, pad)
    x = rng.standard_normal((1, cin, 28, 28)).astype("float32")
    # WHEN it is built with and without the default schedules
    # THEN the outputs agree
    np.testing.assert_allclose(_run(mod, [x], True), _run(mod, [x], False), rtol=RTOL, atol=ATOL)


def test_dense_and_pool_default_schedule_matches_unscheduled() -> None:
    # GIVEN max-pool, global average pool and a dense layer
    rng = np.random.default_rng(1)
    w = relax.const(rng.standard_normal((64, 10)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 64, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.max_pool2d(x, pool_size=3, strides=2, padding=1))
            g = bb.emit(relax.op.nn.adaptive_avg_pool2d(p, output_size=1))
            f = bb.emit(relax.op.reshape(g, (1, 64)))
            out = bb.emit_output(bb.emit(relax.op.matmul(f, w)))
        bb.emit_func_output(out)
    xs = [rng.standard_normal((1, 64, 16, 16)).astype("float32")]
    # WHEN built both ways  THEN the outputs agree
    np.testing.assert_allclose(_run(bb.get(), xs, True), _run(bb.get(), xs, False), rtol=RTOL, atol=ATOL)


def test_small_real_model_matches_unscheduled() -> None:
    # GIVEN light SqueezeNet (real architecture, materialized weights) without its softmax
    from kiln_compiler.samples import input_shapes, load_light_model
    from tvm.relax.frontend.onnx import from_onnx

    model = load_light_model("squeezenet", strip_softmax=True)
    shapes = input_shapes(model)
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    x = np.random.default_rng(2).random(next(iter(shapes.values()))).astype("float32")
    # WHEN built with and without default schedules
    got, want = _run(mod, [x], True), _run(mod, [x], False)
    # THEN logits agree (relative to their scale)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}, None),
        ({"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon"]}, None),
        ({"kind": "llvm", "mtriple": "x86_64-pc-windows-msvc", "mcpu": "haswell"}, None),
        ({"kind": "cuda", "arch": "sm_75"}, {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}),
    ],
)
def test_cross_targets_compile(target: dict, host: dict | None) -> None:
    # GIVEN a conv model  WHEN compiled for a cross or CUDA target  THEN an executable comes back
    mod = _conv_module(np.ones((8, 4, 3, 3), "float32"), 1, 1)
    result = compile_relax(mod, target, host=host)
    assert result.executable is not None
    assert result.summary["default"] > 0


def test_target_lanes() -> None:
    # GIVEN targets  WHEN asking for fp32 lanes  THEN AVX-512 16, AVX2 8, NEON 4
    assert target_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16
    assert target_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 8
    assert target_lanes(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == 4
