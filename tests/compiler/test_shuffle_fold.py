"""ShuffleNet fp32 (ADR 0044): the channel shuffle read through the next grouped matmul's input index, and
batch norm, relu and the residual add computed in the grouped matmuls' kernels.

Tolerance as in test_cpu_kernels.py: rtol/atol 1e-4 on unit-scale data against the unscheduled NCHW build
(which runs none of the graph rewrites); the whole model 1e-4 of its logits' scale against ONNX Runtime.
The units' batch-norm constants are standard normal (not near identity), so a constant or weight permuted
the wrong way is off by the order of the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from kiln_compiler import pipeline  # noqa: E402
from tvm import relax  # noqa: E402

from tests.compiler.conftest import shuffle_unit  # noqa: E402
from tests.compiler.test_cpu_kernels import ATOL, AVX2, RTOL, TARGETS, _run  # noqa: E402


def _kernels(mod: Any, target: dict[str, Any], precision: str = "fp32") -> list[str]:
    """Names of the fused kernels the CPU pipeline makes of ``mod`` (views such as reshapes left out)."""
    with tvm.target.Target(target) as tgt:
        fused = pipeline._cpu_kernels(mod, tgt, True, precision)
    return sorted(gv.name_hint for gv, f in fused.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and not gv.name_hint.startswith("reshape"))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
@pytest.mark.parametrize(("channels", "hw"), [(136, 14), (272, 7), (112, 8)])
def test_residual_shuffle_unit_matches_unscheduled(channels: int, hw: int, target: dict[str, Any]) -> None:
    # GIVEN a ShuffleNet unit with batch norms after every conv and its residual add (4 groups of 34, 68 or 28
    #       channels: the shuffle's index crosses whole vectors, and 34 / 68 are padded per group)
    mod = shuffle_unit(channels, 4, hw, residual=True)
    x = np.random.default_rng(3).standard_normal((1, channels, hw, hw)).astype("float32")
    # WHEN built with Kiln's kernels and without any schedule  THEN the outputs agree
    np.testing.assert_allclose(_run(mod, x, target, True), _run(mod, x, target, False), rtol=RTOL, atol=ATOL)


def test_residual_shuffle_unit_is_three_kernels_without_a_shuffle_pass() -> None:
    # GIVEN a ShuffleNet unit with its batch norms and residual add
    mod = shuffle_unit(136, 4, 14, residual=True)
    # WHEN fused for an AVX2 target
    names = _kernels(mod, AVX2)
    # THEN besides the graph's edge transposes there are three kernels: the first grouped matmul with its scale,
    #      shift and relu; the depthwise conv with its scale and shift; the grouped matmul reading the shuffle
    #      through its index, with its scale and shift, the residual add and the relu. No pass moves the shuffle.
    inner = [n for n in names if "transpose" not in n]
    assert len(names) == 5 and len(inner) == 3, names
    first, depthwise, second = sorted(inner, key=lambda n: ("shuffled" in n, "conv2d" in n))
    assert first.startswith("fused_matmul_") and "relu" in first
    assert depthwise.startswith("fused_conv2d_")
    assert second.startswith("fused_shuffled_matmul_") and second.endswith(("relu1", "relu11")) and "_add" in second


def test_bf16_compile_keeps_the_shuffle_for_its_bf16_matmuls() -> None:
    # GIVEN a ShuffleNet unit  WHEN fused for a bf16 compile (ConvToBF16 converts relax matmuls, ADR 0042)
    names = _kernels(shuffle_unit(136, 4, 14), {"kind": "llvm", "mcpu": "znver4"}, precision="bf16")
    # THEN the shuffle is not folded: both grouped convs stay matmuls (one kernel, called twice), the shuffle and
    #      the batch norm after the first stay below its reshape (bf16 ShuffleNet builds as before ADR 0044)
    assert not any("shuffled_matmul" in n for n in names)
    assert [n for n in names if n.startswith("fused_matmul")] == ["fused_matmul_strided_slice1"], names
    assert any("transpose" in n and "relu" in n for n in names), names


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["mcpu"])
def test_real_shufflenet_folds_every_shuffle_and_matches_onnxruntime(target: dict[str, Any]) -> None:
    # GIVEN the light ShuffleNet (random weights) without its softmax
    import onnxruntime as ort
    from kiln_compiler.samples import input_shapes, load_light_model
    from tvm.relax.frontend.onnx import from_onnx

    model = load_light_model("shufflenet", strip_softmax=True)
    shapes = input_shapes(model)
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    x = np.random.default_rng(4).random(next(iter(shapes.values()))).astype("float32")
    # WHEN compiled with Kiln's kernels
    compiled = pipeline.compile_relax(mod, target)
    assert compiled.unscheduled == []
    got = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    # THEN every one of its 16 shuffles is read through a grouped matmul's index: no shuffle kernel is left
    names = _kernels(mod, target)
    assert sum("shuffled_matmul" in n for n in names) == 6  # 16 calls of 6 distinct kernels
    assert not any("transpose" in n for n in names if not n.startswith(("transpose", "fused_transpose")))
    # AND the logits agree with ONNX Runtime to 1e-4 of their scale
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {next(iter(shapes)): x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
