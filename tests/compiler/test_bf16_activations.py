"""bf16 activations between layers (ADR 0036) and the LRN rewrites: exact where claimed, fp32 where not.

A tensor is cast to bf16 once, above concatenations and max pools: rounding to nearest is monotone
and a concatenation only moves values, so ``round(max(x)) == max(round(x))`` and the bf16 build
must be bit-identical to the build that casts every convolution's input (the path before ADR
0036). ``x ** 0.75`` as ``sqrt(x) * sqrt(sqrt(x))`` and LRN's channel window as a sum of shifted
slices change fp32 rounding only (a few ulp): compared with ONNX Runtime at the fp32 pipeline
tests' tolerance.
"""

from __future__ import annotations

import kiln.runtime
import numpy as np
import onnxruntime as ort
import pytest
import tvm
from kiln_compiler import pipeline
from kiln_compiler.graph import cpu_graph_passes
from kiln_compiler.graph.bf16 import ConvToBF16
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import fire_lrn_cnn

ZEN4 = {"kind": "llvm", "mcpu": "znver4"}
HASWELL = {"kind": "llvm", "mcpu": "haswell"}  # fp32 builds that every x86 host here runs (AVX2)
RTOL, ATOL = 1e-4, 1e-4  # fp32 reassociation, as tests/compiler/test_tvm_pipeline.py

needs_bf16_host = pytest.mark.skipif("avx512_bf16" not in (kiln.runtime.cpu_flags() or set()),
                                     reason="the host has no AVX512-BF16 to run the bf16 code")


def _relax() -> tvm.IRModule:
    return from_onnx(fire_lrn_cnn(), shape_dict={"input": [1, 3, 32, 32]}, keep_params_in_input=False)


def _graph(hoist_casts: bool = True) -> str:
    with tvm.target.Target(ZEN4):
        mod = tvm.transform.Sequential(cpu_graph_passes(16))(_relax())
        return str(ConvToBF16(hoist_casts=hoist_casts)(mod)["main"].script(show_meta=False))


def _run(precision: str, x: np.ndarray, monkeypatch: pytest.MonkeyPatch | None = None,
         hoist_casts: bool = True) -> np.ndarray:
    """Build the CNN at ``precision`` (bf16 for Zen 4, fp32 for Haswell: runnable on an AVX2-only host) and run it."""
    if monkeypatch is not None:
        monkeypatch.setattr(pipeline, "ConvToBF16", lambda: ConvToBF16(hoist_casts=hoist_casts))
    compiled = pipeline.compile_relax(_relax(), ZEN4 if precision == "bf16" else HASWELL, precision=precision)
    assert compiled.unscheduled == []
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    return np.asarray(vm["main"](tvm.runtime.tensor(x)).numpy())


def test_each_activation_is_cast_once_above_concat_and_max_pool() -> None:
    # GIVEN the fire module + LRN CNN in the CPU layout  WHEN ConvToBF16 runs
    text = _graph()
    lines = [ln.strip() for ln in text.splitlines()]
    casts = [ln.split("R.astype(")[1].split(",")[0] for ln in lines if "R.astype(" in ln]
    # THEN no tensor is cast twice (the squeeze output feeds two expand convs through one cast)
    assert len(casts) == len(set(casts)) and casts
    # and the concatenation and both max pools after the stem run on bf16 values: the casts moved above them
    assert any("R.concat(" in ln and 'dtype="bfloat16"' in ln for ln in lines)
    assert not any("R.concat(" in ln and 'dtype="float32"' in ln for ln in lines)
    pools = [ln for ln in lines if "R.nn.max_pool2d(" in ln]
    assert len(pools) == 2 and all('dtype="bfloat16"' in ln for ln in pools)
    # while the path before ADR 0036 cast below them, once per convolution input
    before = [ln.strip() for ln in _graph(hoist_casts=False).splitlines()]
    assert any("R.concat(" in ln and 'dtype="float32"' in ln for ln in before)


def test_lrn_becomes_elementwise_square_roots_and_slices() -> None:
    # GIVEN the CNN with an LRN (size 5, beta 0.75)  WHEN the CPU graph passes run
    text = _graph()
    # THEN neither powf nor the channel-window pool is left: square roots and five shifted slices
    assert "R.power(" not in text and "avg_pool3d" not in text
    assert text.count("R.sqrt(") == 2 and text.count("R.strided_slice(") == 5


def test_lrn_rewrites_keep_fp32_agreement_with_onnx_runtime() -> None:
    # GIVEN the CNN in fp32 and ONNX Runtime running the same model
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype("float32")
    (ref,) = ort.InferenceSession(fire_lrn_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    # WHEN Kiln's fp32 build (LRN rewritten) runs it  THEN the outputs agree to fp32 rounding
    np.testing.assert_allclose(_run("fp32", x), ref, rtol=RTOL, atol=ATOL)


@needs_bf16_host
def test_bf16_activations_are_bit_identical_to_casting_every_conv_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the CNN built in bf16 twice: casts above concat/max pool (ADR 0036) and one per conv input
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype("float32")
    hoisted = _run("bf16", x, monkeypatch, hoist_casts=True)
    per_conv = _run("bf16", x, monkeypatch, hoist_casts=False)
    # WHEN compared  THEN bit-identical: moving a round-to-nearest cast above max and concat is exact
    np.testing.assert_array_equal(hoisted, per_conv)
    # and both are bf16 results (not the fp32 build's)
    assert not np.array_equal(hoisted, _run("fp32", x))
