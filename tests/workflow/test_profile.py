"""A profile on every job whose runner can run its artifact: measured after packaging, in the manifest and on
the job record as the ``Kiln`` extension of DescribeCompilationJob (stock clients ignore it)."""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any

from kiln import runtime


def _run_job(local_stack: Any, service: Any, job_request: Any, upload_model: Any, archive: bytes, name: str,
             target: str) -> dict[str, Any]:
    upload_model(f"{name}/model.tar.gz", archive)
    request = job_request(name)
    request["OutputConfig"]["TargetDevice"] = target
    service.create(request)
    return local_stack.wait_for(name, timeout=300)


def test_local_x86_job_has_a_plausible_profile_in_record_and_manifest(local_stack, service, job_request,
                                                                      upload_model, tiny_onnx_archive, sagemaker,
                                                                      tmp_path):
    # GIVEN a real ONNX model compiled for an x86 target this host can run (ml_c4: AVX2), in local mode
    job = _run_job(local_stack, service, job_request, upload_model, tiny_onnx_archive, "prof-x86", "ml_c4")
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN the record carries a measured profile with latencies, memory and threads that make sense
    profile = job["Kiln"]["Profile"]
    assert profile["measured"] is True, profile
    assert 0 < profile["min_ms"] <= profile["median_ms"] <= profile["p90_ms"] < 1000
    assert 1 <= profile["runs"] <= 20 and profile["warmup_runs"] == 3
    # the child's peak includes the TVM runtime it loaded on top of the bare interpreter
    assert 20 < profile["baseline_rss_mib"] < profile["peak_rss_mib"] < 16384
    assert profile["threads"] == int(os.environ["TVM_NUM_THREADS"])
    assert profile["inputs"] == {"x": [1, 8]}
    assert profile["host"]["runner"] == "local" and profile["host"]["machine"] == "x86_64"
    # AND the artifact's manifest carries the same profile
    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = uri[len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    assert runtime.load(local).manifest["profile"] == profile
    # AND the record says what the job cost: task-seconds on its runner (ml_c4's family), build and profile
    # within them
    timings = service.store.get("prof-x86")["Internal"]["Timings"]
    usage = job["Kiln"]["Usage"]
    assert usage["Runner"] == "batch-c4" and usage["InstanceFamily"] == "c4" and usage["Architecture"] == "x86_64"
    assert usage["TaskSeconds"] == timings["total"]
    assert 0 < usage["ProfileSeconds"] < usage["TaskSeconds"] and 0 < usage["BuildSeconds"] < usage["TaskSeconds"]

    # WHEN a stock boto3 client describes the job
    wire: dict[str, Any] = {}

    def capture(http_response: Any, **_: Any) -> None:
        wire.update(json.loads(http_response.content))

    sagemaker.meta.events.register("after-call.sagemaker.DescribeCompilationJob", capture)
    try:
        described = sagemaker.describe_compilation_job(CompilationJobName="prof-x86")
    finally:
        sagemaker.meta.events.unregister("after-call.sagemaker.DescribeCompilationJob", capture)
    # THEN the wire carries the Kiln member and botocore drops it: the stock response is SageMaker's
    assert wire["Kiln"]["Profile"]["median_ms"] == profile["median_ms"]
    assert "Kiln" not in described and described["CompilationJobStatus"] == "COMPLETED"


def test_cross_target_job_says_why_it_has_no_profile(local_stack, service, job_request, upload_model,
                                                     tiny_onnx_archive, tmp_path):
    # GIVEN a job for Graviton2 (ml_c6g) compiled on this x86 host
    job = _run_job(local_stack, service, job_request, upload_model, tiny_onnx_archive, "prof-c6g", "ml_c6g")
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    # THEN its profile is absent with the reason: this host cannot run an aarch64 artifact
    profile = job["Kiln"]["Profile"]
    assert profile["measured"] is False
    assert "needs a aarch64 machine" in profile["reason"] and "x86_64" in profile["reason"]
    assert "median_ms" not in profile
    # AND the manifest says the same
    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = uri[len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    with tarfile.open(local) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest["profile"] == profile
