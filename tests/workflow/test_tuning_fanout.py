"""Tuning fanned out over workers (ADR 0023): the workflow's Map state runs N tuning workers on the job's runner,
each on its own share of the kernels; one build applies every worker's records. On moto, with real compiler
processes and real (tiny) tuning budgets."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import dense_chain_onnx

# Each worker's budget: enough on a loaded 2-core host for a first measured record per kernel, no more.
BUDGET_MINUTES = 0.75
RUNNER = "batch-c4"  # ml_c4's runner (AVX2: this host can run and so tune it)


def _fan_out(service: Any, job_request: Any, upload_model: Any, name: str, dims: tuple[int, ...],
             workers: int) -> dict[str, Any]:
    upload_model(f"{name}/model.tar.gz", dense_chain_onnx(dims))
    request = job_request(name)
    request["InputConfig"]["DataInputConfig"] = json.dumps({"x": [1, dims[0]]})
    request["OutputConfig"]["CompilerOptions"] = json.dumps(
        {"tuning": {"minutes": BUDGET_MINUTES, "workers": workers}})
    service.create(request)
    return request


def _manifest(local_stack: Any, job: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"][len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    with tarfile.open(local) as tar:
        return json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]


def _worker_records(local_stack: Any, name: str, shard: str) -> int:
    """Measured records (Kiln's tiles and the search's) worker ``shard`` ("i-of-N") left under the job's prefix."""
    s3 = local_stack.client("s3")
    bucket = local_stack.outputs["ArtifactBucket"]
    count = 0
    for file in ("kiln_tuning_record.json", "database_tuning_record.json"):
        key = f"{name}/kiln-tuning/{name}/shard-{shard}/{file}"
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
        if listed:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            count += sum(1 for line in body.splitlines() if line.strip())
    return count


def _check_completed_fan_out(local_stack: Any, job: dict[str, Any], name: str, workers: int, kernels: int,
                             tmp_path: Path) -> list[dict[str, Any]]:
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    usage = job["Kiln"]["Usage"]
    reported = usage["TuningWorkers"]
    assert [w["Shard"] for w in reported] == [f"{i}/{workers}" for i in range(1, workers + 1)]
    # every worker tuned, each its own non-empty share, and the shares add up to the model's kernels
    assert all(w["Status"] == "COMPLETED" for w in reported), reported
    assert sum(w["Kernels"] for w in reported) == kernels and all(w["Kernels"] >= 1 for w in reported)
    for i, worker in enumerate(reported, start=1):
        assert worker["Tuned"] >= 1, worker
        assert _worker_records(local_stack, name, f"{i}-of-{workers}") >= 1, worker
    # the build applied every worker's records: its tuned kernels are theirs
    manifest = _manifest(local_stack, job, tmp_path)
    assert manifest["tuning"]["tuned"] == sum(w["Tuned"] for w in reported)
    # the cost on the record: the build's task-seconds plus every worker's, on the job's runner
    assert usage["Runner"] == RUNNER
    total = usage["TaskSeconds"] + sum(w["TaskSeconds"] for w in reported)
    assert usage["TaskSecondsByRunner"] == {RUNNER: pytest.approx(total, abs=0.01)}
    assert all(w["TaskSeconds"] > 0 for w in reported)
    return reported


@pytest.mark.slow
def test_two_workers_each_tune_their_share_and_the_build_applies_both(local_stack, service, job_request,
                                                                     upload_model, compiler_slots, tmp_path):
    # GIVEN a three-layer network and CompilerOptions asking for 2 tuning workers (room for both at once)
    compiler_slots(2)
    _fan_out(service, job_request, upload_model, "fan-two", (8, 24, 20, 4), workers=2)
    # WHEN the job runs
    job = local_stack.wait_for("fan-two", timeout=600)
    # THEN it completed with records from both workers, on disjoint shares covering the three kernels
    reported = _check_completed_fan_out(local_stack, job, "fan-two", 2, kernels=3, tmp_path=tmp_path)
    assert sorted(w["Kernels"] for w in reported) == [1, 2]


@pytest.mark.slow
def test_three_workers_run_at_once_and_all_records_are_applied(local_stack, service, job_request, upload_model,
                                                              compiler_slots, tmp_path):
    # GIVEN a three-layer network and 3 tuning workers, with capacity for all of them at once
    compiler_slots(3)
    runner = local_stack.runner
    runner.peak_running = runner.running()
    _fan_out(service, job_request, upload_model, "fan-three", (8, 28, 18, 6), workers=3)
    # WHEN the job runs
    job = local_stack.wait_for("fan-three", timeout=600)
    # THEN each worker tuned one kernel and the build applied all three
    reported = _check_completed_fan_out(local_stack, job, "fan-three", 3, kernels=3, tmp_path=tmp_path)
    assert [w["Kernels"] for w in reported] == [1, 1, 1]
    # AND the three workers ran as parallel processes
    assert runner.peak_running >= 3


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_kernels(local_stack, service, job_request, upload_model, compiler_fault,
                                               compiler_slots, snapshot, contained, tmp_path):
    # GIVEN a two-worker job whose worker 2 is killed (SIGKILL, as the OOM killer does) when it starts tuning
    compiler_slots(2)
    compiler_fault("fan-killed", "crash@tune.2")
    upload_model("fan-killed/model.tar.gz", dense_chain_onnx((8, 26, 22, 4)))
    before = snapshot()
    request = job_request("fan-killed")
    request["OutputConfig"]["CompilerOptions"] = json.dumps({"tuning": {"minutes": BUDGET_MINUTES, "workers": 2}})
    service.create(request)
    # WHEN the job runs
    job = contained("fan-killed", before, status="COMPLETED", timeout=600)
    # THEN the job still completed; worker 2 is on the record as failed, with why, and left no records
    worker_1, worker_2 = job["Kiln"]["Usage"]["TuningWorkers"]
    assert worker_1["Status"] == "COMPLETED" and worker_1["Tuned"] >= 1
    assert worker_2 == {"Shard": "2/2", "Status": "FAILED", "Reason": worker_2["Reason"]}
    assert "killed (SIGKILL)" in worker_2["Reason"]
    assert _worker_records(local_stack, "fan-killed", "1-of-2") >= 1
    assert _worker_records(local_stack, "fan-killed", "2-of-2") == 0
    # AND the artifact applies worker 1's records; worker 2's kernel kept its default schedule
    manifest = _manifest(local_stack, job, tmp_path)
    assert manifest["tuning"]["tuned"] == worker_1["Tuned"]
    assert manifest["tuning"]["default"] >= 3 - worker_1["Kernels"]


def test_a_worker_past_max_runtime_fails_the_whole_job(local_stack, service, job_request, upload_model,
                                                      compiler_fault, compiler_slots, start_with_limits, snapshot,
                                                      contained):
    # GIVEN a two-worker job limited to 25 s of runtime whose worker 1 hangs (heartbeats go on)
    compiler_slots(2)
    compiler_fault("fan-limit", "hang@tune.1")
    upload_model("fan-limit/model.tar.gz", dense_chain_onnx((8, 30, 4)))
    before = snapshot()
    request = job_request("fan-limit")
    request["OutputConfig"]["CompilerOptions"] = json.dumps({"tuning": {"minutes": 5, "workers": 2}})
    # WHEN the job runs
    start_with_limits(request, pending=120, runtime=25)
    # THEN the limit holds for the job as a whole: FAILED for MaxRuntimeInSeconds, no worker left running,
    # no build started
    job = contained("fan-limit", before, status="FAILED",
                    reason_prefix="ClientError: the compilation exceeded MaxRuntimeInSeconds (25 s)")
    assert not job["ModelArtifacts"]["S3ModelArtifacts"]


def test_the_build_gets_what_is_left_of_the_job_limits(local_stack, service, job_request):
    # GIVEN a job that started 100 s ago with 150 s of pending + runtime
    name = "fan-plan"
    now = time.time()
    job = {**job_request(name), "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}",
           "CompilationJobStatus": "INPROGRESS", "CreationTime": now, "LastModifiedTime": now}
    service.store.create(job, extra={"Runner": RUNNER})
    service.store.set_fields(name, {"CompilationStartTime": now - 100})
    limits = {"MaxRuntimeInSeconds": 90, "MaxPendingTimeInSeconds": 60, "TotalSeconds": 150}
    steps = local_stack.kiln.workflow_steps
    # WHEN its workers are done and the build is planned
    planned = steps.plan_build(job, limits)
    # THEN the build's state timeout is the ~50 s left; the limits the reasons quote are unchanged
    assert 45 <= planned["TotalSeconds"] <= 50
    assert planned["MaxRuntimeInSeconds"] == 90 and planned["MaxPendingTimeInSeconds"] == 60
    # AND a job already past its limits gets 1 s (its build times out at once)
    service.store.set_fields(name, {"CompilationStartTime": now - 1000})
    assert steps.plan_build(job, limits)["TotalSeconds"] == 1
