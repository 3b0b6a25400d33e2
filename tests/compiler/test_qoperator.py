"""QOperator ONNX models (QLinearConv, com.microsoft QLinearAdd, QGemm, ..., ConvInteger) and old-IR QDQ models.

QOperator nodes are rewritten to the QDQ form before import (``kiln_compiler.loaders.qoperator``), so
they take the integer path of the QDQ models. Tolerance as in test_int8: outputs compared in units of
the output's quantization scale, at most 1 apart (a requantization product within float32 rounding
of a .5 tie), almost all identical. ``quantize_dynamic`` models (ConvInteger) end in float: the
integer convolution is exact, the float epilogue agrees to float32 rounding.
"""

from __future__ import annotations

import collections
import tarfile
from pathlib import Path

import kiln.runtime
import numpy as np
import onnx
import pytest
from kiln_compiler.accuracy import reference_session
from kiln_compiler.errors import ClientError
from kiln_compiler.graph import QuantizedConvToInteger
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import compile_artifact, disassemble

MIN_EXACT = 0.95  # share of outputs equal to ONNX Runtime's (measured: 100% on every model here)
VNNI_OPTIONS = '{"mcpu": "cascadelake"}'  # an ml_c5 job asking for a CPU with AVX512-VNNI


def _has_vnni() -> bool:
    return "avx512_vnni" in (kiln.runtime.cpu_flags() or set())


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _loaded(model_dir: Path) -> object:
    return load_model("ONNX", model_dir, DataInputConfig(), CompilerOptions())


def _output_unit(model: onnx.ModelProto) -> float:
    """Scale of the DequantizeLinear that produces the graph's output."""
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    assert node.op_type == "DequantizeLinear", node.op_type
    return float(init[node.input[1]])


def _against_onnxruntime(artifact: Path, model_dir: Path, seeds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(Kiln's outputs, ONNX Runtime's) of the artifact and of the archive's model.onnx on seeded random inputs."""
    model = kiln.runtime.load(artifact)
    session = reference_session(str(model_dir / "model.onnx"))
    spec = model.inputs[0]
    got, want = [], []
    for seed in range(seeds):
        x = np.random.default_rng(seed).standard_normal(spec.shape).astype("float32")
        got.append(model.run({spec.name: x})[0])
        want.append(session.run(None, {spec.name: x})[0])
    return np.stack(got).astype("float64"), np.stack(want).astype("float64")


def _units_apart(model_dir: Path, artifact: Path) -> np.ndarray:
    got, want = _against_onnxruntime(artifact, model_dir)
    assert np.ptp(want) > 0  # the comparison is not between constants
    return np.rint(np.abs(got - want) / _output_unit(onnx.load(str(model_dir / "model.onnx"))))


def test_qoperator_nodes_become_qdq_chains_and_integer_convolutions(qop_small_cnn_dir: Path) -> None:
    # GIVEN small_cnn quantized to QOperator: three QLinearConv, one QLinearGlobalAveragePool
    qop = onnx.load(str(qop_small_cnn_dir / "model.onnx"))
    assert _ops(qop)["QLinearConv"] == 3 and _ops(qop)["QLinearGlobalAveragePool"] == 1
    # WHEN the ONNX loader imports it and the integer rewrite runs
    loaded = _loaded(qop_small_cnn_dir)
    rewrite = QuantizedConvToInteger()
    rewrite(loaded.mod)  # type: ignore[attr-defined]
    # THEN each QLinearConv arrived as DequantizeLinear -> Conv -> QuantizeLinear and is a u8 x s8 -> s32 convolution
    assert rewrite.rewritten == 3


def test_qoperator_small_cnn_uses_vpdpbusd_and_matches_onnxruntime(qop_small_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN the QOperator small CNN compiled through the job's path for ml_c5 with a VNNI CPU (mcpu cascadelake)
    artifact = compile_artifact(qop_small_cnn_dir, "ONNX", "ml_c5", tmp_path, options=VNNI_OPTIONS)
    # WHEN its library is disassembled
    with tarfile.open(artifact) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    # THEN its code multiplies with vpdpbusd
    assert "vpdpbusd" in disassemble(tmp_path / "x/model.so")
    if not _has_vnni():
        pytest.skip("the host has no AVX512-VNNI to run the artifact")
    # AND WHEN it and ONNX Runtime run the same QOperator model: at most 1 quantized unit apart, almost all identical
    units = _units_apart(qop_small_cnn_dir, artifact)
    assert units.max() <= 1 and np.mean(units == 0) >= MIN_EXACT


def test_every_quantized_operator_of_a_cnn_matches_onnxruntime(qop_ops_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN a QOperator model with QLinearConv, QLinearLeakyRelu, QLinearSigmoid, QLinearAdd, QLinearMul,
    # QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool, QGemm, QLinearMatMul and QLinearSoftmax
    ops = _ops(onnx.load(str(qop_ops_cnn_dir / "model.onnx")))
    expected = {"QLinearConv", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearAdd", "QLinearMul", "QLinearConcat",
                "QLinearAveragePool", "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul", "QLinearSoftmax"}
    assert expected <= set(ops), sorted(expected - set(ops))
    # WHEN compiled for ml_c4 (AVX2: integer values in fp32 kernels) and run beside ONNX Runtime
    units = _units_apart(qop_ops_cnn_dir, compile_artifact(qop_ops_cnn_dir, "ONNX", "ml_c4", tmp_path))
    # THEN at most 1 quantized unit apart, almost all identical
    assert units.max() <= 1 and np.mean(units == 0) >= MIN_EXACT


def test_conv_integer_model_matches_onnxruntime(dynamic_small_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN small_cnn quantized by quantize_dynamic (DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul)
    assert _ops(onnx.load(str(dynamic_small_cnn_dir / "model.onnx")))["ConvInteger"] == 3
    # WHEN compiled for ml_c4 and run beside ONNX Runtime
    got, want = _against_onnxruntime(compile_artifact(dynamic_small_cnn_dir, "ONNX", "ml_c4", tmp_path),
                                     dynamic_small_cnn_dir)
    # THEN the float outputs agree to float32 rounding (the int32 convolutions are exact)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_qoperator_squeezenet_matches_onnxruntime(qop_squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN SqueezeNet 1.0 quantized to QOperator (26 QLinearConv, 8 QLinearConcat, QLinearSoftmax at the end)
    # WHEN compiled for ml_c4 and run beside ONNX Runtime on the same QOperator model
    units = _units_apart(qop_squeezenet_dir, compile_artifact(qop_squeezenet_dir, "ONNX", "ml_c4", tmp_path))
    # THEN at most 1 quantized unit apart, almost all identical
    assert units.max() <= 1 and np.mean(units == 0) >= MIN_EXACT


def _with_node(model_dir: Path, tmp_path: Path, edit: object) -> Path:
    """An archive holding the archive's model.onnx after ``edit(model)``."""
    model = onnx.load(str(model_dir / "model.onnx"))
    edit(model)  # type: ignore[operator]
    d = tmp_path / "edited"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"))
    return d


def test_unsupported_quantized_operator_is_a_client_error_naming_it(qop_small_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN the QOperator small CNN whose global pool became com.microsoft QLinearReduceMean (no rewrite for it)
    def edit(model: onnx.ModelProto) -> None:
        node = next(n for n in model.graph.node if n.op_type == "QLinearGlobalAveragePool")
        node.op_type = "QLinearReduceMean"
        del node.attribute[:]

    # WHEN the loader reads it  THEN a ClientError names the operator and says what Kiln compiles instead
    with pytest.raises(ClientError, match=r"quantized operator\(s\) \['QLinearReduceMean'\].*QuantFormat.QDQ"):
        _loaded(_with_node(qop_small_cnn_dir, tmp_path, edit))


def test_channels_last_quantized_pool_is_a_client_error(qop_small_cnn_dir: Path, tmp_path: Path) -> None:
    # GIVEN the QOperator small CNN with its QLinearGlobalAveragePool marked channels_last (NHWC)
    def edit(model: onnx.ModelProto) -> None:
        node = next(n for n in model.graph.node if n.op_type == "QLinearGlobalAveragePool")
        kept = [a for a in node.attribute if a.name != "channels_last"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("channels_last", 1)])

    # WHEN loaded  THEN a ClientError names the operator, its node and the attribute
    with pytest.raises(ClientError, match=r"QLinearGlobalAveragePool \(node '.*'\) has channels_last=1"):
        _loaded(_with_node(qop_small_cnn_dir, tmp_path, edit))


def test_old_ir_qdq_model_compiles_and_matches_onnxruntime(old_ir_qdq_dir: Path, tmp_path: Path) -> None:
    # GIVEN a QDQ model of IR version 3 whose scales and zero points are initializers outside the graph inputs
    model = onnx.load(str(old_ir_qdq_dir / "model.onnx"))
    outside = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    assert model.ir_version == 3 and outside
    with pytest.raises(onnx.checker.ValidationError):  # what ONNX's checker says of it
        onnx.checker.check_model(model)
    # WHEN compiled for ml_c4 and run beside ONNX Runtime (which runs it as it is)
    units = _units_apart(old_ir_qdq_dir, compile_artifact(old_ir_qdq_dir, "ONNX", "ml_c4", tmp_path))
    # THEN it compiles, and the outputs are at most 1 quantized unit apart
    assert units.max() <= 1 and np.mean(units == 0) >= MIN_EXACT
