"""bench/ukernel.py's AVX2 C micro-kernel prototype (ADR 0046): numerically a convolution, and the MLAS tile
really takes its weights as FMA memory operands (the thing the experiment measured)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.unit.conftest import load_bench_module


def _host_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or not _host_has_avx2_fma(),
                                reason="needs gcc and an AVX2/FMA host")


@pytest.fixture(scope="module")
def ukernel_bench() -> ModuleType:
    return load_bench_module("ukernel")


@pytest.fixture(scope="module")
def ukernel_build(ukernel_bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    work = tmp_path_factory.mktemp("ukernel")
    return ukernel_bench.c_library(work), work / "ukernel.s"


def _reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """conv (pad k // 2) + bias + relu in numpy, as H, W, K."""
    cout, _, k, _ = w.shape
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    ho = (x.shape[1] + 2 * pad - k) // stride + 1
    out = np.zeros((ho, ho, cout), "float64")
    for r in range(k):
        for s in range(k):
            window = xp[:, r:r + stride * ho:stride, s:s + stride * ho:stride]  # C, ho, ho
            out += np.einsum("chw,kc->hwk", window, w[:, :, r, s])
    return np.maximum(out + bias, 0.0)


@pytest.mark.parametrize(("cin", "cout", "k", "hw", "stride"), [
    (24, 64, 1, 7, 1),   # 49 pixels: tiles of 6 / 3 / 4 and their 1-pixel tails
    (16, 32, 3, 9, 1),   # 3x3 taps over a padded input, tiles across rows
    (8, 32, 3, 11, 2),   # strided 3x3
])
@pytest.mark.parametrize(("mode", "pixels"), [(0, 6), (2, 6), (3, 6), (0, 4), (1, 3), (1, 2)])
@pytest.mark.parametrize("channels_outer", [True, False])
def test_micro_kernel_computes_the_convolution(ukernel_bench: ModuleType, ukernel_build: tuple[Any, Path],
                                               cin: int, cout: int, k: int, hw: int, stride: int, mode: int,
                                               pixels: int, channels_outer: bool) -> None:
    # GIVEN a random conv + bias + relu and each tile variant the experiment timed, in either loop order
    so, _ = ukernel_build
    rng = np.random.default_rng(cin * 100 + k)
    x = rng.standard_normal((cin, hw, hw)).astype("float32")
    w = (rng.standard_normal((cout, cin, k, k)) * 0.2).astype("float32")
    bias = rng.standard_normal(cout).astype("float32")
    # WHEN the C micro-kernel computes it
    got = ukernel_bench.ukernel_conv(so, x, w, bias, stride, mode, pixels, channels_outer)
    # THEN every output (tails included: the buffer starts as NaN) equals numpy's within fp32 rounding
    np.testing.assert_allclose(got, _reference(x, w, bias, stride), rtol=1e-4, atol=1e-4)


def test_micro_kernel_refuses_a_tile_beyond_its_registers(ukernel_bench: ModuleType,
                                                          ukernel_build: tuple[Any, Path]) -> None:
    # GIVEN the MLAS tile (4 vectors: 12 accumulators + 3 broadcasts fill AVX2's 16 registers)
    so, _ = ukernel_build
    x = np.ones((8, 5, 5), "float32")
    w = np.ones((32, 8, 1, 1), "float32")
    # WHEN it is asked for 4 pixels THEN the kernel says no instead of computing a wrong tile
    with pytest.raises(ValueError, match="does not take 8->32 1x1 in mode 1 x 4 pixels"):
        ukernel_bench.ukernel_conv(so, x, w, np.zeros(32, "float32"), 1, 1, 4)


def test_mlas_tile_takes_weights_as_fma_memory_operands(ukernel_build: tuple[Any, Path]) -> None:
    # GIVEN the prototype's assembly
    _, asm = ukernel_build
    text = asm.read_text()
    # WHEN its 3-pixel x 4-vector loop is looked up (three broadcasts, then the FMAs)
    start = text.index("vbroadcastss (%")
    loop = text[start:text.index("jnz 1b", start)]
    # THEN all twelve FMAs read their weight vector from memory, and nothing is spilled to the stack
    assert loop.count("vfmadd231ps") == 12
    assert all("(%" in line for line in loop.splitlines() if "vfmadd231ps" in line)
    assert "rsp" not in loop
