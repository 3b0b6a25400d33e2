"""``CompilerOptions {"precision": "bf16"}``: convolutions on ``vdpbf16ps``, their deviation from fp32 on the record.

Tolerance: bf16 keeps fp32's exponent and 8 of its 24 significand bits, so rounding an operand
(round to nearest even) moves it by at most 2^-9 of its value; the products and sums are exact /
fp32. A dot product's error is then at most ~2^-8 of the sum of its terms' magnitudes, and each
bf16 layer adds that much again relative to its output. The small CNN has three bf16 layers (the
3-channel stem padded to 4), so its outputs may be off by a few 2^-8 of their scale: asserted at
4 x 3 x 2^-8 (5%) of the largest output, where a wrong kernel (a dropped pair, a
misplaced weight) is off by the order of the output itself. SqueezeNet's 26 bf16 layers: the
top class must stay the same and the error within 5% of the largest logit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import kiln.runtime
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln_compiler.graph import cpu_graph_passes
from kiln_compiler.graph.bf16 import ConvToBF16
from tvm.relax.frontend.onnx import from_onnx

from tests.compiler.conftest import compile_artifact, small_cnn

BF16_LAYER_ERROR = 2.0**-8  # relative error one bf16 layer may add (8-bit significand)
BF16_OPTIONS = '{"precision": "bf16", "mcpu": "znver4"}'

needs_bf16_host = pytest.mark.skipif("avx512_bf16" not in (kiln.runtime.cpu_flags() or set()),
                                     reason="the host has no AVX512-BF16 to run the bf16 code")


@pytest.fixture(scope="module")
def small_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding ``small_cnn`` as model.onnx."""
    d = tmp_path_factory.mktemp("bf16_small_cnn") / "archive"
    d.mkdir()
    onnx.save(small_cnn(), str(d / "model.onnx"))
    return d


@pytest.fixture(scope="module")
def small_cnn_bf16(small_cnn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small CNN compiled with bf16 for ml_c5 with a Zen 4 mcpu: the artifact (.tar.gz)."""
    return compile_artifact(small_cnn_dir, "ONNX", "ml_c5", tmp_path_factory.mktemp("bf16_build"),
                            options=BF16_OPTIONS)


def _manifest(artifact: Path) -> dict[str, object]:
    with tarfile.open(artifact) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest: dict[str, object] = json.loads(member.read())
        return manifest


def _relax_small_cnn() -> object:
    return from_onnx(small_cnn(), shape_dict={"input": [1, 3, 32, 32]}, keep_params_in_input=False)


def test_every_dense_convolution_is_converted_the_rgb_stem_padded_to_4_channels() -> None:
    # GIVEN the small CNN in the CPU graph layout (NHWC/HWIO): convolutions 3->16, 16->32, 32->32
    import tvm

    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        mod = tvm.transform.Sequential(cpu_graph_passes(16))(_relax_small_cnn())
        # WHEN ConvToBF16 runs
        rewrite = ConvToBF16()
        out = rewrite(mod)
    # THEN all three take bf16 operands with fp32 results; the 3-channel stem gets one zero channel
    assert rewrite.converted == 3
    text = out.script()
    assert text.count('out_dtype="float32"') == 3 and "R.nn.pad" in text
    assert 'R.Tensor((1, 32, 32, 4), dtype="bfloat16") = R.nn.pad' in text
    # and the weights were converted at compile time: no cast of a constant is left in the graph
    assert "R.astype(metadata" not in text


def test_depthwise_convolutions_stay_fp32() -> None:
    # GIVEN a depthwise (16 groups of 1 channel) NHWC convolution with constant weights
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "float32"))
    w = relax.const(np.ones((3, 3, 1, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, padding=1, groups=16, data_layout="NHWC",
                                                  kernel_layout="HWIO"))
        bb.emit_func_output(y)
    # WHEN ConvToBF16 runs  THEN nothing is converted (the 16x2 kernel blocks dense channels only)
    rewrite = ConvToBF16()
    out = rewrite(bb.get())
    assert rewrite.converted == 0 and "bfloat16" not in out.script()


def _disassembly(precision: str, mcpu: str, tmp_path: Path) -> str:
    from kiln_compiler.pipeline import compile_relax

    compiled = compile_relax(_relax_small_cnn(), {"kind": "llvm", "mcpu": mcpu}, precision=precision)
    assert compiled.unscheduled == []
    lib = tmp_path / f"{precision}-{mcpu}.so"
    compiled.executable.export_library(str(lib))
    objdump = shutil.which("objdump")
    assert objdump is not None, "binutils' objdump is needed to inspect the generated code"
    return subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(("precision", "mcpu", "expected"), [
    ("bf16", "znver4", True), ("bf16", "sapphirerapids", True), ("fp32", "znver4", False)])
def test_bf16_convolutions_use_vdpbf16ps(tmp_path: Path, precision: str, mcpu: str, expected: bool) -> None:
    # GIVEN the small CNN  WHEN compiled for an AVX512-BF16 CPU in bf16, or in fp32
    asm = _disassembly(precision, mcpu, tmp_path)
    # THEN the bf16 build multiplies with vdpbf16ps (the 16x2 kernel) and rounds the activations it passes on
    # with vcvtneps2bf16 (ADR 0052), the fp32 build does neither
    assert ("vdpbf16ps" in asm) is expected
    assert ("vcvtneps2bf16" in asm) is expected


@needs_bf16_host
def test_bf16_small_cnn_agrees_with_fp32_within_the_bf16_tolerance(small_cnn_dir: Path, small_cnn_bf16: Path) -> None:
    # GIVEN the bf16 artifact of the small CNN and ONNX Runtime running the fp32 model
    x = np.random.default_rng(11).standard_normal((1, 3, 32, 32)).astype("float32")
    (out,) = kiln.runtime.load(small_cnn_bf16).run({"input": x})
    (ref,) = ort.InferenceSession(small_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    # WHEN compared  THEN within three bf16 layers' error of the output's scale (see the module docstring)
    error = float(np.abs(out - ref).max())
    assert error <= 4 * 3 * BF16_LAYER_ERROR * float(np.abs(ref).max())
    # and not bit-identical: the convolutions really ran on bf16 operands
    assert error > 0


@needs_bf16_host
def test_manifest_records_the_deviation_from_the_fp32_build(small_cnn_bf16: Path) -> None:
    # GIVEN the bf16 artifact  WHEN its manifest is read
    precision = _manifest(small_cnn_bf16)["precision"]
    # THEN it carries the measured deviation from the fp32 build on the sample inputs
    assert isinstance(precision, dict)
    assert precision["dtype"] == "bf16" and precision["measured"] is True and precision["samples"] == 4
    assert 0 < precision["mean_abs_error"] <= precision["max_abs_error"]
    assert precision["max_abs_error"] <= 4 * 3 * BF16_LAYER_ERROR * precision["max_abs_reference"]
    # the small CNN's [1, 32] output is class scores: top-1 agreement is reported
    assert 0.0 <= precision["top1_agreement"] <= 1.0


@pytest.mark.slow
@needs_bf16_host
def test_bf16_squeezenet_keeps_the_top_class(squeezenet_dir: Path, squeezenet: onnx.ModelProto,
                                             tmp_path: Path) -> None:
    # GIVEN SqueezeNet compiled in bf16
    artifact = compile_artifact(squeezenet_dir, "ONNX", "ml_c5", tmp_path, options=BF16_OPTIONS)
    (name, shape), = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                      for i in squeezenet.graph.input}.items()
    x = np.random.default_rng(2).standard_normal(shape).astype("float32")
    # WHEN it and ONNX Runtime (fp32) run the same input
    (out,) = kiln.runtime.load(artifact).run({name: x})
    (ref,) = ort.InferenceSession(squeezenet.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {name: x})
    # THEN the same class comes out on top, and the record agrees on the four sample inputs
    assert int(out.argmax()) == int(ref.argmax())
    assert float(np.abs(out - ref).max()) <= 0.05 * float(np.abs(ref).max())
    precision = _manifest(artifact)["precision"]
    assert isinstance(precision, dict) and precision["top1_agreement"] == 1.0


def test_bf16_for_graviton3_builds_and_says_why_its_deviation_was_not_measured(small_cnn_dir: Path,
                                                                                tmp_path: Path) -> None:
    # GIVEN a bf16 job for Graviton3 (LINUX_ARM64, neoverse-v1: ARMv8.6 BF16; no vdpbf16ps kernel, so the
    # default schedules run over the bf16 operands)
    # WHEN it is compiled on this x86 host
    artifact = compile_artifact(small_cnn_dir, "ONNX", "LINUX:ARM64", tmp_path,
                                options='{"precision": "bf16", "mcpu": "neoverse-v1"}')
    # THEN the artifact is built, and its record says the deviation could not be measured here, and why
    precision = _manifest(artifact)["precision"]
    assert isinstance(precision, dict)
    assert precision["dtype"] == "bf16" and precision["measured"] is False
    assert "cannot run code for mcpu 'neoverse-v1'" in str(precision["reason"])
