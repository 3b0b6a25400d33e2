"""Quantize-by-calibration: ``CompilerOptions {"quantize": {"dtype": "int8", "calibration": ...}}`` (ADR 0027).

Tolerances. Against ONNX Runtime running the QDQ model that ``quantize_static`` makes from the same
calibration inputs (the reference for integer arithmetic): at most 1 unit of the output's quantization
scale, almost all values identical, for the reason stated in tests/compiler/test_int8.py (a requantization
product on the other side of a .5 tie). Against the fp32 model (the job's ``precision`` record): int8 rounds
every activation to 1/255 of its calibrated range, so each of the small CNN's layers may move the output by
a few units; a wrong kernel is off by the order of the output itself. The record's error is asserted within
10% of the largest fp32 output, the top class must agree on most samples, and the error must be ONNX
Runtime's own int8 error (its QDQ model vs the fp32 model, same samples) within 1 output unit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import boto3
import kiln.runtime
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln import rules
from kiln_compiler import aws
from kiln_compiler.accuracy import reference_session
from kiln_compiler.errors import ClientError
from kiln_compiler.quantize import read_calibration
from kiln_compiler.samples import quantize_qdq

from tests.compiler.conftest import (
    CALIBRATION,
    calibration_samples,
    compile_artifact,
    entrypoint_job,
    make_tar,
    run_entrypoint,
    small_cnn,
    target_named,
)

MEMBER = "outputConfig.compilerOptions.quantize.calibration"
OPTIONS = json.dumps({"quantize": {"dtype": "int8", "calibration": CALIBRATION}})
MIN_EXACT = 0.95  # share of outputs identical to ONNX Runtime's on the same QDQ model
FP32_TOLERANCE = 0.10  # the record's max error vs the fp32 model, as a share of the largest fp32 output

needs_avx512 = pytest.mark.skipif("avx512f" not in (kiln.runtime.cpu_flags() or set()),
                                  reason="the host has no AVX-512 to run ml_c5 code")


def _output_scale(model: onnx.ModelProto) -> float:
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(init[node.input[1]])


def _disassembly(artifact: Path, tmp_path: Path) -> str:
    with tarfile.open(artifact) as tar:
        tar.extract("model.so", tmp_path / "unpacked", filter="data")
    objdump = shutil.which("objdump")
    assert objdump is not None, "binutils' objdump is needed to inspect the generated code"
    return subprocess.run([objdump, "-d", str(tmp_path / "unpacked" / "model.so")], capture_output=True, text=True,
                          check=True).stdout


def _units_vs_onnxruntime(artifact: Path, qdq: onnx.ModelProto) -> tuple[int, float]:
    """(max difference in output quantization units, share identical) of the artifact vs ONNX Runtime running
    ``qdq``, on two of the calibration samples."""
    model = kiln.runtime.load(artifact)
    session = reference_session(qdq.SerializeToString())
    units = []
    for sample in calibration_samples()[:2]:
        (out,) = model.run({"input": sample[None]})
        (ref,) = session.run(None, {"input": sample[None]})
        units.append(np.rint(np.abs(out.astype("float64") - ref) / _output_scale(qdq)))
    stacked = np.concatenate(units)
    return int(stacked.max()), float(np.mean(stacked == 0))


@needs_avx512
def test_calibrated_cnn_for_ml_c5_matches_onnxruntime_and_records_its_deviation(
        calibrated_dir: Path, reference_qdq: onnx.ModelProto, tmp_path: Path) -> None:
    # GIVEN the fp32 small CNN and 8 calibration samples in the archive, quantize int8 for ml_c5 (AVX-512, no VNNI)
    # WHEN compile_model builds it as a job does
    artifact = compile_artifact(calibrated_dir, "ONNX", "ml_c5", tmp_path, options=OPTIONS)
    # THEN it computes what ONNX Runtime computes on the QDQ model quantize_static makes from the same inputs
    worst, exact = _units_vs_onnxruntime(artifact, reference_qdq)
    assert worst <= 1 and exact >= MIN_EXACT, (worst, exact)
    # AND the manifest records its deviation from the fp32 model on the calibration inputs
    record = kiln.runtime.load(artifact).manifest["precision"]
    assert record["dtype"] == "int8" and record["measured"] is True, record
    assert record["samples"] == 8 and record["calibration_samples"] == 8
    assert record["reference"].startswith("fp32 model in onnxruntime")
    assert 0 < record["max_abs_error"] <= FP32_TOLERANCE * record["max_abs_reference"], record
    assert 0 < record["mean_abs_error"] <= record["max_abs_error"]
    assert record["top1_agreement"] >= 0.75, record
    # and it is ONNX Runtime's own int8 deviation from fp32 on those samples, within 1 output unit
    ort_error, ort_top1 = _onnxruntime_int8_deviation(small_cnn(), reference_qdq, "input", calibration_samples())
    assert abs(record["max_abs_error"] - ort_error) <= 1.001 * _output_scale(reference_qdq), (record, ort_error)
    assert record["top1_agreement"] == ort_top1
    # AND without VNNI on the target the integer convolutions run as exact fp32 arithmetic (no vpdpbusd)
    assert "vpdpbusd" not in _disassembly(artifact, tmp_path)


def test_calibrated_cnn_for_a_vnni_cpu_multiplies_with_vpdpbusd(calibrated_dir: Path,
                                                                reference_qdq: onnx.ModelProto,
                                                                tmp_path: Path) -> None:
    # GIVEN the same job for ml_c5 with a Cascade Lake mcpu (AVX512-VNNI)
    options = json.dumps({**json.loads(OPTIONS), "mcpu": "cascadelake"})
    # WHEN it is compiled
    artifact = compile_artifact(calibrated_dir, "ONNX", "ml_c5", tmp_path, options=options)
    # THEN the integer convolutions multiply u8 x s8 with vpdpbusd
    assert "vpdpbusd" in _disassembly(artifact, tmp_path)
    # AND where this host can run it, the outputs agree with ONNX Runtime on the same QDQ model
    if "avx512_vnni" in (kiln.runtime.cpu_flags() or set()):
        worst, exact = _units_vs_onnxruntime(artifact, reference_qdq)
        assert worst <= 1 and exact >= MIN_EXACT, (worst, exact)
    else:
        assert kiln.runtime.load(artifact, check=False).manifest["precision"]["measured"] is False


def _broken(kind: str, d: Path) -> str:
    """Write a calibration file that is wrong in one way into the archive ``d``; its name in the archive."""
    rng = np.random.default_rng(0)
    if kind == "missing":
        return "calib/other.npz"
    name = f"calib/{kind}.npz"
    path = d / name
    arrays: dict[str, Any] = {"input": rng.standard_normal((2, 3, 32, 32)).astype("float32")}
    if kind == "not-npz":
        path.write_bytes(b"input,1,2,3\n")
        return name
    if kind == "wrong-name":
        arrays = {"data": arrays["input"]}
    elif kind == "extra-array":
        arrays["labels"] = np.zeros(2, "int64")
    elif kind == "wrong-shape":
        arrays = {"input": rng.standard_normal((2, 3, 28, 28)).astype("float32")}
    elif kind == "wrong-dtype":
        arrays = {"input": arrays["input"].astype("float64")}
    elif kind == "too-many-samples":
        arrays = {"input": np.zeros((rules.MAX_CALIBRATION_SAMPLES + 1, 3, 1, 1), "float32")}
    elif kind == "nan":
        arrays["input"][1, 0, 0, 0] = np.nan
    elif kind == "objects":
        arrays = {"input": np.array([{"x": 1}, None], dtype=object)}
    elif kind == "one-sample":
        arrays = {"input": arrays["input"][:1]}
    np.savez(path, **arrays)
    return name


@pytest.mark.parametrize(("kind", "expected"), [
    ("missing", "is not in the model archive"),
    ("not-npz", "is not an .npz file"),
    ("wrong-name", "missing ['input'], not inputs ['data']"),
    ("extra-array", "not inputs ['labels']"),
    ("wrong-shape", "has shape [2, 3, 28, 28]; the model's input 'input' is [1, 3, 32, 32]"),
    ("wrong-dtype", "is float64; the model's input 'input' takes float32"),
    ("nan", "holds NaN or infinite values"),
    ("objects", "holds Python objects"),
])
def test_a_bad_calibration_file_fails_the_job_naming_the_member(calibrated_dir: Path, tmp_path: Path, kind: str,
                                                                expected: str) -> None:
    # GIVEN a calibration file that is missing or does not fit the model's inputs
    archive = tmp_path / "archive"
    shutil.copytree(calibrated_dir, archive)
    name = _broken(kind, archive)
    options = json.dumps({"quantize": {"dtype": "int8", "calibration": name}})
    # WHEN the job compiles
    with pytest.raises(ClientError) as info:
        compile_artifact(archive, "ONNX", "ml_c4", tmp_path / "out", options=options)
    # THEN it fails with a ClientError naming the member and the file as the user named it, no path of this machine
    reason = info.value.reason
    assert reason.startswith("ClientError: OutputConfiguration: "), reason
    assert MEMBER in reason and expected in reason, reason
    assert str(tmp_path) not in reason and "Traceback" not in reason


@pytest.mark.parametrize(("shape", "batched"), [((5, 3, 32, 32), True), ((5, 1, 3, 32, 32), False)])
def test_samples_lie_on_the_leading_axis_in_either_form(tmp_path: Path, shape: tuple[int, ...],
                                                        batched: bool) -> None:
    # GIVEN 5 samples for an input [1, 3, 32, 32], stacked on the batch axis or on a new leading axis
    np.savez(tmp_path / "c.npz", input=np.arange(np.prod(shape), dtype="float32").reshape(shape))
    # WHEN read against the model's inputs
    calibration = read_calibration(tmp_path / "c.npz", [kiln.runtime.TensorSpec("input", (1, 3, 32, 32),
                                                                                 "float32")], "c.npz")
    # THEN there are 5 samples, each shaped like the input, in order
    feeds = list(calibration.feeds())
    assert calibration.samples == 5 and calibration.batched == {"input": batched}
    assert [f["input"].shape for f in feeds] == [(1, 3, 32, 32)] * 5
    assert feeds[1]["input"].ravel()[0] == 3 * 32 * 32


@pytest.mark.parametrize(("kind", "expected"), [
    ("too-many-samples", f"holds {rules.MAX_CALIBRATION_SAMPLES + 1} samples; give 1 to"),
    ("one-sample", None),
])
def test_sample_count_limits(tmp_path: Path, kind: str, expected: str | None) -> None:
    # GIVEN more samples than the cap, or a single one
    (tmp_path / "calib").mkdir()
    name = _broken(kind, tmp_path)
    spec = kiln.runtime.TensorSpec("input", (1, 3, 1, 1) if kind == "too-many-samples" else (1, 3, 32, 32),
                                   "float32")
    # WHEN read  THEN the cap is refused naming the member; one sample is enough
    if expected is None:
        assert read_calibration(tmp_path / name, [spec], name).samples == 1
        return
    with pytest.raises(ClientError, match=MEMBER.replace(".", r"\.")) as info:
        read_calibration(tmp_path / name, [spec], name)
    assert expected in str(info.value)


def test_an_already_quantized_model_and_an_s3_calibration_outside_a_job_are_refused(
        qdq_small_cnn_dir: Path, calibrated_dir: Path, tmp_path: Path) -> None:
    # GIVEN a QDQ model with a calibration file, and the fp32 model with an s3:// calibration outside a job
    archive = tmp_path / "qdq"
    shutil.copytree(qdq_small_cnn_dir, archive)
    shutil.copytree(calibrated_dir / "calib", archive / "calib")
    s3_options = json.dumps({"quantize": {"dtype": "int8", "calibration": "s3://user-models/c.npz"}})
    # WHEN compiled  THEN each is a ClientError saying what to do
    with pytest.raises(ClientError, match="already quantized"):
        compile_artifact(archive, "ONNX", "ml_c4", tmp_path / "a", options=OPTIONS)
    with pytest.raises(ClientError, match="only a compilation job reads it"):
        compile_artifact(calibrated_dir, "ONNX", "ml_c4", tmp_path / "b", options=s3_options)


def test_an_old_ir_model_quantizes_to_a_valid_qdq_model(tmp_path: Path) -> None:
    # GIVEN the small CNN as an old exporter writes it: opset 9, IR version 3, every initializer a graph input
    from kiln_compiler.quantize import Calibration, quantize_model

    model = small_cnn()
    model.opset_import[0].version, model.ir_version = 9, 3
    model.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in model.graph.initializer)
    onnx.checker.check_model(model)
    calibration = Calibration(arrays={"input": calibration_samples(2)}, samples=2, batched={"input": True})
    # WHEN Kiln quantizes it
    qdq = quantize_model(model, calibration, tmp_path)
    # THEN the QDQ model is valid ONNX (its new scales need not be graph inputs) and ONNX Runtime runs it
    onnx.checker.check_model(qdq)
    assert qdq.opset_import[0].version == 13 and sum(n.op_type == "DequantizeLinear" for n in qdq.graph.node) > 3
    session = ort.InferenceSession(str(tmp_path / "qdq.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": calibration_samples(1)})[0].shape == (1, 32)


def test_compile_model_refuses_quantize_for_a_framework_kiln_does_not_quantize(tmp_path: Path) -> None:
    # GIVEN an XGBoost model directory and quantize options (the API refuses the pair; so does the library call)
    from kiln_compiler import CompilerOptions, compile_model

    options = CompilerOptions.parse(OPTIONS, target_named("ml_c4"))
    # WHEN / THEN compile_model refuses it before loading anything
    with pytest.raises(ClientError, match="applies to ONNX models, not XGBOOST"):
        compile_model(tmp_path, "XGBOOST", target_named("ml_c4"), options, out_dir=tmp_path / "out")


def test_an_s3_calibration_over_the_cap_is_refused_before_download(buckets: Any, tmp_path: Path) -> None:
    # GIVEN a calibration object of 2048 bytes and a cap of 1024
    buckets.put_object(Bucket="user-models", Key="cal/big.npz", Body=b"\0" * 2048)
    # WHEN the job downloads it  THEN it is refused naming the member, and nothing is left on disk
    with pytest.raises(ClientError, match="is 2048 bytes; at most 1024 are read") as info:
        aws.download_capped(boto3.Session(), "s3://user-models/cal/big.npz", tmp_path / "c.npz", 1024, MEMBER)
    assert MEMBER in str(info.value) and not (tmp_path / "c.npz").exists()


def test_entrypoint_reads_an_s3_calibration_through_the_role(buckets: Any, aws_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    # GIVEN the fp32 small CNN in S3 and its calibration inputs as a separate S3 object
    arc = make_tar(tmp_path / "cnn.tar.gz", {"model.onnx": small_cnn().SerializeToString()})
    buckets.upload_file(str(arc), "user-models", "in/cnn.tar.gz")
    np.savez(tmp_path / "samples.npz", input=calibration_samples())
    buckets.upload_file(str(tmp_path / "samples.npz"), "user-models", "cal/samples.npz")
    options = json.dumps({"quantize": {"dtype": "int8", "calibration": "s3://user-models/cal/samples.npz"}})
    job = entrypoint_job("e2e-calib", "s3://user-models/in/cnn.tar.gz", CompilerOptions=options)
    job["InputConfig"]["DataInputConfig"] = '{"input": [1, 3, 32, 32]}'
    missing = {**job, "OutputConfig": {**job["OutputConfig"], "CompilerOptions": options.replace("samples", "nope")}}
    # WHEN the container entrypoint runs it (ml_c4), and a job whose calibration object does not exist
    (tmp_path / "ok").mkdir()
    (tmp_path / "missing").mkdir()
    proc = run_entrypoint(job, aws_env, tmp_path / "ok")
    failed = run_entrypoint(missing, aws_env, tmp_path / "missing")
    # THEN the job succeeds with the deviation from fp32 and the agreement with ONNX Runtime on its QDQ model
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "calibration" in result["Timings"] and "quantize" in result["Timings"]
    precision, accuracy = result["Precision"], result["Accuracy"]
    assert precision["dtype"] == "int8" and precision["measured"] is True and precision["samples"] == 8
    assert accuracy["measured"] is True and accuracy["max_abs_diff_units"] <= 1, accuracy
    # AND the missing object is a ClientError naming the member
    assert failed.returncode == 1, failed.stderr[-2000:]
    cause = json.loads(failed.stdout.strip().splitlines()[-1])["Cause"]
    assert cause.startswith("ClientError: OutputConfiguration: cannot read s3://user-models/cal/nope.npz")
    assert MEMBER in cause and "Traceback" not in cause


@pytest.mark.slow
def test_calibrated_squeezenet_for_a_vnni_cpu(squeezenet_dir: Path, squeezenet: onnx.ModelProto,
                                              tmp_path: Path) -> None:
    # GIVEN SqueezeNet 1.0 (fp32) and 4 calibration images, quantize int8 for ml_c5 with a Zen 4 mcpu (VNNI)
    archive = tmp_path / "archive"
    shutil.copytree(squeezenet_dir, archive)
    images = np.random.default_rng(2).standard_normal((4, 3, 224, 224)).astype("float32")
    np.savez(archive / "calibration.npz", data_0=images)
    options = json.dumps({"quantize": {"dtype": "int8", "calibration": "calibration.npz"}, "mcpu": "znver4"})
    # WHEN compiled
    artifact = compile_artifact(archive, "ONNX", "ml_c5", tmp_path, options=options)
    # THEN its convolutions use vpdpbusd and the record says how far it is from the fp32 model
    assert "vpdpbusd" in _disassembly(artifact, tmp_path)
    record = kiln.runtime.load(artifact, check=False).manifest["precision"]
    assert record["dtype"] == "int8" and record["calibration_samples"] == 4
    if "avx512_vnni" not in (kiln.runtime.cpu_flags() or set()):
        assert record["measured"] is False
        return
    assert record["measured"] is True and record["samples"] == 4
    # AND it agrees with ONNX Runtime on the QDQ model quantize_static makes from the same images
    # (SqueezeNet ends in a softmax of dequantized logits: a 1-unit tie in a logit moves a probability by up to
    # its logit scale times itself, measured up to 2 output units on 0.3% of the values: the tolerance here)
    qdq = quantize_qdq(squeezenet, tmp_path / "reference", images=images)
    unit = _output_scale(qdq)
    model = kiln.runtime.load(artifact)
    session = reference_session(qdq.SerializeToString())
    units = np.concatenate([np.rint(np.abs(model.run({"data_0": image[None]})[0] - session.run(
        None, {"data_0": image[None]})[0]) / unit).ravel() for image in images[:2]])
    assert units.max() <= 2 and np.mean(units == 0) >= 0.99, (units.max(), np.mean(units == 0))
    # AND its recorded deviation from fp32 is ONNX Runtime's own int8 deviation, within those 2 units (the softmax
    # output of a random-weight SqueezeNet moves by ~15% of its largest value under int8, in both)
    ort_error, ort_top1 = _onnxruntime_int8_deviation(squeezenet, qdq, "data_0", images)
    assert abs(record["max_abs_error"] - ort_error) <= 2.001 * unit, (record, ort_error)
    assert record["top1_agreement"] == ort_top1


def _onnxruntime_int8_deviation(fp32: onnx.ModelProto, qdq: onnx.ModelProto, name: str,
                                images: np.ndarray) -> tuple[float, float]:
    """(max abs error, top-1 agreement) of ONNX Runtime running ``qdq`` vs running ``fp32``, per image."""
    sessions = [reference_session(m.SerializeToString()) for m in (fp32, qdq)]
    error, agree = 0.0, 0
    for image in images:
        want, got = (s.run(None, {name: image[None]})[0].reshape(1, -1) for s in sessions)
        error = max(error, float(np.abs(got.astype("float64") - want).max()))
        agree += int(got.argmax() == want.argmax())
    return error, agree / len(images)
