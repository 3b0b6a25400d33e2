"""bf16 ShuffleNet layers (ADR 0042): grouped pointwise convolutions on ``vdpbf16ps`` over the group axis; and
a padded convolution's slice computed from the bf16 kernel's tiles.

Tolerance as in test_bf16.py: each bf16 layer may add ~2^-8 of its output's scale (operands rounded to
8 significand bits, products and sums in fp32). The ShuffleNet unit has two bf16 layers (the grouped
1x1 convolutions; the depthwise 3x3 stays fp32), asserted at 4 x 2 x 2^-8 (3%) of the largest output;
a dropped pair or misplaced weight block is off by the order of the output itself. The padded-convolution block has two
bf16 layers too (the padded 40-channel convolution, the 1x1 convolution after the pool).
"""

from __future__ import annotations

import re
from pathlib import Path

import kiln.runtime
import numpy as np
import pytest
import tvm
from kiln_compiler.graph import cpu_graph_passes
from kiln_compiler.graph.bf16 import ConvToBF16
from kiln_compiler.pipeline import compile_relax
from tvm import relax

from tests.compiler.conftest import disassemble, kernel_asm, shuffle_unit, sliced_conv_block

BF16_LAYER_ERROR = 2.0**-8
ZEN4 = {"kind": "llvm", "mcpu": "znver4"}


def _agreement(bf16: object, fp32: object, x: np.ndarray) -> None:
    if "avx512_bf16" not in (kiln.runtime.cpu_flags() or set()):
        pytest.skip("the host has no AVX512-BF16 to run the bf16 code")
    out, ref = _run(bf16, x), _run(fp32, x)
    error = float(np.abs(out - ref).max())
    assert 0 < error <= 4 * 2 * BF16_LAYER_ERROR * float(np.abs(ref).max())


def _run(compiled: object, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())  # type: ignore[attr-defined]
    return np.asarray(vm["main"](tvm.runtime.tensor(x)).numpy())


def test_grouped_pointwise_convolutions_become_bf16_matmuls_the_depthwise_stays_fp32() -> None:
    # GIVEN a ShuffleNet unit (4 groups of 34 channels) in the CPU layout: two grouped 1x1 convs as batched matmuls
    with tvm.target.Target(ZEN4):
        # (shuffles kept, as a bf16 compile keeps them: ADR 0044)
        mod = tvm.transform.Sequential(cpu_graph_passes(16, fp32_shuffle_units=False))(shuffle_unit(136, 4, 14))
        # WHEN ConvToBF16 runs
        rewrite = ConvToBF16()
        text = rewrite(mod)["main"].script(show_meta=False)
    # THEN both matmuls take bf16 operands with an fp32 result; the depthwise 3x3 reads fp32
    assert rewrite.converted == 2
    matmuls = [ln for ln in text.splitlines() if "R.matmul(" in ln]
    assert len(matmuls) == 2 and all('out_dtype="float32"' in ln for ln in matmuls)
    (depthwise,) = [ln for ln in text.splitlines() if "R.nn.conv2d(" in ln]
    assert 'dtype="float32") = R.nn.conv2d(' in depthwise


def test_grouped_matmul_whose_input_channels_are_odd_stays_fp32() -> None:
    # GIVEN 4 groups of 17 input channels (not whole vdpbf16ps pairs)
    with tvm.target.Target(ZEN4):
        mod = tvm.transform.Sequential(cpu_graph_passes(16, fp32_shuffle_units=False))(shuffle_unit(68, 4, 7))
        # WHEN ConvToBF16 runs  THEN the grouped convolutions keep fp32 (the 16x2 block does not fit)
        rewrite = ConvToBF16()
        rewrite(mod)
    assert rewrite.converted == 0


@pytest.mark.parametrize(("channels", "hw"), [(136, 14), (272, 7)])
def test_bf16_shuffle_unit_runs_vdpbf16ps_and_agrees_with_fp32(channels: int, hw: int, tmp_path: Path) -> None:
    # GIVEN a ShuffleNet unit (4 groups of 34 or 68 channels, padded to 48 / 80 outputs per group)
    mod = shuffle_unit(channels, 4, hw)
    # WHEN compiled in bf16 and in fp32 for Zen 4
    bf16 = compile_relax(mod, ZEN4, precision="bf16")
    fp32 = compile_relax(mod, ZEN4, precision="fp32")
    assert bf16.unscheduled == [] and fp32.unscheduled == []
    lib = tmp_path / "bf16.so"
    bf16.executable.export_library(str(lib))
    # THEN the grouped matmul kernel multiplies with vdpbf16ps
    (name,) = {m.group(1) for m in re.finditer(r"<(fused_matmul\w*?)(?:_compute_)?>:", disassemble(lib))}
    assert "vdpbf16ps" in kernel_asm(disassemble(lib), name)
    # and its outputs agree with the fp32 build within two bf16 layers' error, not bit-identical
    _agreement(bf16, fp32, np.random.default_rng(1).standard_normal((1, channels, hw, hw)).astype("float32"))


def test_padded_convolution_stays_padded_and_sliced_in_bf16() -> None:
    # GIVEN a 40-channel convolution, padded to 48 by the CPU layout passes  WHEN ConvToBF16 runs
    with tvm.target.Target(ZEN4):
        mod = tvm.transform.Sequential(cpu_graph_passes(16))(sliced_conv_block())
        rewrite = ConvToBF16()
        text = rewrite(mod)["main"].script(show_meta=False)
    # THEN it computes 48 channels (3 blocks of 16) in bf16 from 4 input channels, sliced back to 40
    assert rewrite.converted == 2
    assert 'R.Tensor((1, 32, 32, 48), dtype="float32") = R.nn.conv2d(' in text
    assert 'R.Tensor((1, 32, 32, 40), dtype="float32") = R.strided_slice(' in text


def test_bf16_padded_convolution_slices_from_its_tiles_and_agrees_with_fp32(tmp_path: Path) -> None:
    # GIVEN the padded-convolution block  WHEN compiled in bf16 and fp32 for Zen 4
    mod = sliced_conv_block()
    bf16 = compile_relax(mod, ZEN4, precision="bf16")
    fp32 = compile_relax(mod, ZEN4, precision="fp32")
    assert bf16.unscheduled == [] and fp32.unscheduled == []
    lib = tmp_path / "bf16.so"
    bf16.executable.export_library(str(lib))
    asm = disassemble(lib)
    # THEN one kernel (convolution, slice, bias, relu, cast) multiplies with vdpbf16ps
    (name,) = {m.group(1) for m in re.finditer(r"<(fused_conv2d\w*strided_slice\w*?)(?:_compute_)?>:", asm)}
    assert "vdpbf16ps" in kernel_asm(asm, name)
    # and the block agrees with the fp32 build within two bf16 layers' error (the slice taken from the tiles)
    _agreement(bf16, fp32, np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype("float32"))
