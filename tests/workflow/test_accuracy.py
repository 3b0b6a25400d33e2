"""Accuracy on the record: a QDQ ONNX model's artifact compared with ONNX Runtime running the same QDQ model,
in the manifest and on the job record (the ``Kiln`` extension of DescribeCompilationJob, next to the profile)."""

from __future__ import annotations

from typing import Any

from kiln import runtime


def _run(local_stack: Any, service: Any, job_request: Any, upload_model: Any, archive: bytes, name: str,
         target: str, data_input: str) -> dict[str, Any]:
    upload_model(f"{name}/model.tar.gz", archive)
    request = job_request(name)
    request["OutputConfig"]["TargetDevice"] = target
    request["InputConfig"]["DataInputConfig"] = data_input
    service.create(request)
    return local_stack.wait_for(name, timeout=300)


def test_qdq_job_records_its_agreement_with_onnxruntime(local_stack, service, job_request, upload_model,
                                                        qdq_small_cnn_archive, tmp_path):
    # GIVEN a QDQ CNN (quantize_static: u8 activations, per-channel s8 weights) compiled for ml_c4 in local mode
    job = _run(local_stack, service, job_request, upload_model, qdq_small_cnn_archive, "acc-qdq", "ml_c4",
               '{"input": [1, 3, 32, 32]}')
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN the record carries the measured agreement with ONNX Runtime on the same QDQ model:
    # at most 1 unit of the output's quantization scale apart, almost all values identical
    acc = job["Kiln"]["Accuracy"]
    assert acc["measured"] is True, acc
    assert acc["reference"].startswith("onnxruntime ") and acc["inputs"] == 2
    (out,) = acc["outputs"]
    assert out["unit"] > 0 and out["max_abs_diff_units"] <= 1 and acc["max_abs_diff_units"] <= 1
    assert out["max_abs_diff"] <= out["unit"] * 1.001
    assert 95.0 <= acc["identical_pct"] <= 100.0
    # AND the artifact's manifest carries the same member
    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = uri[len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    assert runtime.load(local).manifest["accuracy"] == acc


def test_fp32_job_has_no_accuracy_member(local_stack, service, job_request, upload_model, tiny_onnx_archive):
    # GIVEN an fp32 ONNX model (no QuantizeLinear/DequantizeLinear)
    job = _run(local_stack, service, job_request, upload_model, tiny_onnx_archive, "acc-fp32", "ml_c4",
               '{"x": [1, 8]}')
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN its record has a profile but no accuracy member: there is nothing quantized to compare
    assert "Profile" in job["Kiln"] and "Accuracy" not in job["Kiln"]


def test_cross_target_qdq_job_says_why_it_has_no_agreement(local_stack, service, job_request, upload_model,
                                                           qdq_small_cnn_archive):
    # GIVEN the QDQ CNN compiled for Graviton2 (ml_c6g) on this x86 host
    job = _run(local_stack, service, job_request, upload_model, qdq_small_cnn_archive, "acc-c6g", "ml_c6g",
               '{"input": [1, 3, 32, 32]}')
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN the accuracy member says why it was not measured (this host cannot run an aarch64 artifact)
    acc = job["Kiln"]["Accuracy"]
    assert acc["measured"] is False and "cannot run the artifact" in acc["reason"]
