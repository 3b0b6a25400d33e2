"""bf16 epilogues (ADR 0049): an identity block's add reads its shortcut from the bf16 copy the block's first
convolution reads, so the block before it writes bf16 only; batch-norm scales are folded into the weights.

Rounding the shortcut changes results (once per block, 2^-9 of its value at most, as OpenVINO's bf16 does):
the bf16 build is compared with the fp32 build within ADR 0022's bound, 4 x bf16 layers x 2^-8 of the output
scale, where the shortcut counts as one more rounded layer per block; a dropped or misplaced shortcut is off
by the order of the output itself. Folding a batch norm's scale into the weights rounds the scaled weight
instead of the weight (the same bound per layer).
"""

from __future__ import annotations

import re

import kiln.runtime
import numpy as np
import pytest
import tvm
from kiln_compiler import pipeline
from kiln_compiler.graph import cpu_graph_passes
from kiln_compiler.graph.bf16 import ConvToBF16
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import residual_bn_block

BF16_LAYER_ERROR = 2.0**-8
ZEN4 = {"kind": "llvm", "mcpu": "znver4"}
IDENTITY_BLOCKS = 2
# 4 convolutions in the projection block, 3 in each identity block, plus each identity block's shortcut
BF16_LAYERS = 4 + IDENTITY_BLOCKS * (3 + 1)

needs_bf16_host = pytest.mark.skipif("avx512_bf16" not in (kiln.runtime.cpu_flags() or set()),
                                     reason="the host has no AVX512-BF16 to run the bf16 code")


def _relax() -> tvm.IRModule:
    return from_onnx(residual_bn_block(identity_blocks=IDENTITY_BLOCKS), shape_dict={"input": [1, 16, 16, 16]},
                     keep_params_in_input=False)


ON = {"bf16_residuals": True, "fold_scales": True}  # both ADR 0049 rules (off by default, see the ADR)


def _graph(**options: bool) -> tuple[ConvToBF16, str]:
    options = {**ON, **options}
    with tvm.target.Target(ZEN4):
        mod = tvm.transform.Sequential(cpu_graph_passes(16))(_relax())
        rewrite = ConvToBF16(**options)
        return rewrite, str(rewrite(mod)["main"].script(show_meta=False))


def _kernel_outputs(bf16_residuals: bool) -> list[str]:
    """``name dtype shape`` of every kernel call of the fused bf16 graph."""
    with tvm.target.Target(ZEN4) as tgt, pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "ConvToBF16", lambda: ConvToBF16(bf16_residuals=bf16_residuals))
        text = pipeline._cpu_kernels(_relax(), tgt, True, "bf16")["main"].script(show_meta=False)
    return [f"{m.group(1)} {m.group(3)} {m.group(2)}" for m in re.finditer(
        r"R\.call_tir\((?:cls\.)?(\w+), .*out_ty=R\.Tensor\(\(([0-9, ]+)\), dtype=\"(\w+)\"\)", text)]


def _run(precision: str, x: np.ndarray, **options: bool) -> np.ndarray:
    options = {**ON, **options}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "ConvToBF16", lambda: ConvToBF16(**options))
        compiled = pipeline.compile_relax(_relax(), ZEN4, precision=precision)
    assert compiled.unscheduled == []
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    return np.asarray(vm["main"](tvm.runtime.tensor(x)).numpy())


def test_identity_shortcuts_are_read_from_the_bf16_copy() -> None:
    # GIVEN a projection bottleneck and two identity bottlenecks in the CPU layout  WHEN ConvToBF16 runs
    rewrite, text = _graph()
    # THEN each identity block's add reads its shortcut widened from bf16; the projection's add reads fp32
    assert rewrite.residuals == IDENTITY_BLOCKS
    widened = {m.group(1) for m in re.finditer(r"(\w+): R\.Tensor\(\(1, 16, 16, 64\), dtype=\"float32\"\) = "
                                               r"R\.astype\(\w+, dtype=\"float32\"\)", text)}
    adds = [ln for ln in text.splitlines() if "R.add(" in ln and "(1, 16, 16, 64)" in ln
            and any(f"R.add({v}," in ln or f", {v})" in ln for v in widened)]
    assert len(widened) == len(adds) == IDENTITY_BLOCKS
    # and without the rule (before ADR 0049) no shortcut is rounded
    assert _graph(bf16_residuals=False)[0].residuals == 0


def test_blocks_before_an_identity_block_write_bf16_only() -> None:
    # GIVEN the same model's fused kernels, with and without bf16 shortcuts
    with_rule, without = _kernel_outputs(True), _kernel_outputs(False)
    # WHEN counting the 64-channel activations written in fp32
    fp32 = [k for k in with_rule if k.endswith("float32 1, 16, 16, 64")]
    fp32_before = [k for k in without if k.endswith("float32 1, 16, 16, 64")]
    # THEN only the projection shortcut and the last block's output (read by the average pool) stay fp32;
    # the two block outputs that feed identity blocks are written in bf16 by their producing kernels
    assert len(fp32) == 2 and len(fp32_before) == 2 + IDENTITY_BLOCKS
    assert not [k for k in with_rule if k.startswith("cast")]  # no cast pass of its own


@needs_bf16_host
def test_bf16_shortcuts_agree_with_fp32_within_the_bf16_tolerance() -> None:
    # GIVEN the model built in fp32, in bf16 with fp32 shortcuts, and in bf16 with bf16 shortcuts
    x = np.random.default_rng(5).standard_normal((1, 16, 16, 16)).astype("float32")
    ref, before, after = _run("fp32", x), _run("bf16", x, bf16_residuals=False, fold_scales=False), \
        _run("bf16", x, fold_scales=False)
    scale = float(np.abs(ref).max())
    # WHEN compared with the fp32 build  THEN both bf16 builds are within the bound, and the shortcut
    # rounding is a real change (not bit-identical to the fp32-shortcut build)
    assert 0 < float(np.abs(after - ref).max()) <= 4 * BF16_LAYERS * BF16_LAYER_ERROR * scale
    assert 0 < float(np.abs(before - ref).max()) <= 4 * BF16_LAYERS * BF16_LAYER_ERROR * scale
    assert not np.array_equal(after, before)


def test_batch_norm_scales_are_folded_into_the_bf16_weights() -> None:
    # GIVEN the model's ten convolutions, each followed by a batch norm (subtract, multiply, multiply, add)
    # WHEN ConvToBF16 runs
    rewrite, text = _graph()
    # THEN every batch norm's scale is in its convolution's weights: one per-channel add is left in each epilogue
    assert rewrite.folded == rewrite.converted == 10
    assert "R.multiply(" not in text and "R.subtract(" not in text
    # while without the fold (before ADR 0049) the batch norms stay in the epilogues
    plain, before = _graph(fold_scales=False)
    assert plain.folded == 0 and before.count("R.multiply(") == 20


@needs_bf16_host
def test_folded_batch_norms_agree_with_fp32_within_the_bf16_tolerance() -> None:
    # GIVEN the model built in fp32, and in bf16 with and without the batch norms folded into the weights
    x = np.random.default_rng(6).standard_normal((1, 16, 16, 16)).astype("float32")
    ref, unfolded, folded = _run("fp32", x), _run("bf16", x, fold_scales=False), _run("bf16", x)
    scale = float(np.abs(ref).max())
    # WHEN compared with the fp32 build  THEN the folded build is within the bound, and it is a different
    # rounding (the scaled weights), not the unfolded build's result
    assert 0 < float(np.abs(folded - ref).max()) <= 4 * BF16_LAYERS * BF16_LAYER_ERROR * scale
    assert 0 < float(np.abs(unfolded - ref).max()) <= 4 * BF16_LAYERS * BF16_LAYER_ERROR * scale
    assert not np.array_equal(folded, unfolded)


def test_both_rules_are_off_by_default() -> None:
    # GIVEN the model  WHEN ConvToBF16 runs with its defaults (ADR 0049: off until a quiet-host A/B shows a gain)
    with tvm.target.Target(ZEN4):
        mod = tvm.transform.Sequential(cpu_graph_passes(16))(_relax())
        rewrite = ConvToBF16()
        text = str(rewrite(mod)["main"].script(show_meta=False))
    # THEN no shortcut is read in bf16 and every batch norm stays in its epilogue, as before ADR 0049
    assert rewrite.converted == 10 and rewrite.residuals == 0 and rewrite.folded == 0
    assert text.count("R.multiply(") == 20
