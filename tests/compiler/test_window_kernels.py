"""Sliding-window kernels (depthwise convolutions, pooling) tiled by schedules/window.py, against the
unscheduled build (tolerances as in test_cpu_kernels: fp32 summation order differs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from kiln import isa  # noqa: E402
from kiln_compiler import pipeline  # noqa: E402
from kiln_compiler.graph import cpu_graph_passes  # noqa: E402
from kiln_compiler.schedules import default_schedule  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from tests.compiler.test_cpu_kernels import (  # noqa: E402
    ATOL,
    AVX2,
    RTOL,
    TARGETS,
    _conv_block,
    _run,
    assert_tile_variants_match_unscheduled,
)


def _pool_block(kind: str, channels: int, hw: int, size: int, stride: int, pad: int) -> Any:
    """A pooling layer after a relu (so the pool is its own kernel, as in the models)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, channels, hw, hw), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            if kind == "max":
                y = bb.emit(relax.op.nn.max_pool2d(y, pool_size=size, strides=stride, padding=pad))
            elif kind == "avg":  # ONNX AveragePool: padding not counted
                y = bb.emit(relax.op.nn.avg_pool2d(y, pool_size=size, strides=stride, padding=pad,
                                                   count_include_pad=False))
            else:  # GlobalAveragePool
                y = bb.emit(relax.op.mean(y, axis=[2, 3], keepdims=True))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


WINDOWS = {
    # name: builder of (module, input channels, input side)
    "max_pool_3x3_s2_pad1": (lambda: _pool_block("max", 24, 28, 3, 2, 1), 24, 28),  # ShuffleNet/ResNet stem
    "max_pool_3x3_s2_odd_map": (lambda: _pool_block("max", 96, 27, 3, 2, 0), 96, 27),  # SqueezeNet
    "avg_pool_3x3_s2_pad1_136": (lambda: _pool_block("avg", 136, 14, 3, 2, 1), 136, 14),  # 8.5 AVX-512 vectors
    "avg_pool_7x7_global": (lambda: _pool_block("avg", 64, 7, 7, 1, 0), 64, 7),  # ResNet-50's last pool
    "global_mean": (lambda: _pool_block("mean", 64, 7, 0, 0, 0), 64, 7),
    "depthwise_3x3_136_s1": (lambda: _conv_block(136, 136, 3, 1, 1, 28, 136, seed=5), 136, 28),
    "depthwise_3x3_136_s2": (lambda: _conv_block(136, 136, 3, 2, 1, 28, 136, seed=6), 136, 28),
    "depthwise_5x5_pad2": (lambda: _conv_block(32, 32, 5, 1, 2, 14, 32, seed=7), 32, 14),
}


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_kernel_matches_unscheduled(name: str, target: dict[str, Any]) -> None:
    # GIVEN a depthwise convolution (with its batch-norm-like epilogue) or a pooling layer
    build, channels, hw = WINDOWS[name]
    x = np.random.default_rng(len(name)).standard_normal((1, channels, hw, hw)).astype("float32")
    # WHEN built with Kiln's kernels and without any schedule  THEN the outputs agree
    np.testing.assert_allclose(_run(build(), x, target, True), _run(build(), x, target, False),
                               rtol=RTOL, atol=ATOL)


def _fused_kernel(mod: Any, lanes: int, hint: str) -> Any:
    with tvm.target.Target(AVX2):
        fused = tvm.transform.Sequential(pipeline._fuse_passes())(
            tvm.transform.Sequential(cpu_graph_passes(lanes))(mod))
    (func,) = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and hint in gv.name_hint]
    return func


def test_window_kernel_reads_its_input_without_a_padded_copy() -> None:
    # GIVEN ShuffleNet's depthwise 3x3 (padding 1) fused with its batch norm
    func = _fused_kernel(_conv_block(136, 136, 3, 1, 1, 28, 136, seed=5), 8, "conv2d")
    assert "pad_temp" in func.script()
    # WHEN Kiln's default schedule is applied for AVX2
    text = default_schedule(func, isa.VectorUnit(8, 16)).mod["main"].script()
    # THEN no padded copy is written (it cost more than the window itself): the update reads the
    #      input through the bounds check, over a vector of channels, and the bias, scale and
    #      relu are the write-back's
    assert 'T.sblock("pad_temp")' not in text
    update = text[text.index('T.sblock("group_conv2d_nhwc_update")'):]
    assert "if_then_else" in update[:update.index("T.sblock(", 20)]
    assert "T.vectorized(T.int64(8))" in text
    assert text.count('T.sblock("') - text.count('T.sblock("root")') == 3, text  # init, update, write-back


@pytest.mark.parametrize("name", ["depthwise_3x3_136_s2", "max_pool_3x3_s2_pad1"])
def test_every_tile_variant_of_a_window_kernel_matches_unscheduled(name: str) -> None:
    # GIVEN a fused window kernel and the tile variants tuning measures
    build, _, _ = WINDOWS[name]
    func = _fused_kernel(build(), 8, "conv2d" if "depthwise" in name else "pool")
    vector = isa.VectorUnit(8, 16)
    # WHEN each tile variant schedules it, THEN every distinct schedule computes what the unscheduled kernel does
    assert_tile_variants_match_unscheduled(func, vector, seed=9)
