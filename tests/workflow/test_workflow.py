"""The state machine in statemachine/ running on moto's interpreter, with the real handlers in-process
and the real compiler entrypoint as a local process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kiln import runtime
from kiln.workflow import TransientError, WorkflowSteps

from tests.conftest import tar_gz, tiny_onnx_model
from tests.workflow.conftest import wait_until

TERMINAL = {"COMPLETED", "FAILED", "STOPPED"}


def _statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["detail"]["CompilationJobStatus"] for e in events]


def _compiler_log(stack: Any, name: str) -> str:
    path = Path(stack.work_dir) / "containers" / name / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_success_records_artifact_digest_and_events(local_stack, service, job_request, upload_model,
                                                    tiny_onnx_archive, job_events, tmp_path):
    # GIVEN a real ONNX model in S3
    request = job_request("wf-success")
    upload_model("wf-success/model.tar.gz", tiny_onnx_archive)
    # WHEN the job runs through the whole workflow
    service.create(request)
    job = local_stack.wait_for("wf-success", timeout=300)
    # THEN it completes with an artifact at {S3OutputLocation}/{basename}-{target}.tar.gz and its digest
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert uri == f"{request['OutputConfig']['S3OutputLocation']}/model-ml_c4.tar.gz"
    assert job["ModelDigests"]["ArtifactDigest"].startswith("sha256:")
    assert job["CompilationStartTime"] <= job["CompilationEndTime"]
    # AND the artifact runs and agrees with the model's own arithmetic
    bucket, key = uri[len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    model = runtime.load(local)
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    onnx_model = tiny_onnx_model()
    weights = {i.name: np.frombuffer(i.raw_data, dtype=np.float32).reshape(tuple(i.dims))
               for i in onnx_model.graph.initializer}
    expected = np.maximum(x @ weights["W"] + weights["b"], 0)
    np.testing.assert_allclose(model.run({"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    # AND one event per status change, ending in COMPLETED with the artifact
    assert wait_until(lambda: "COMPLETED" in _statuses(job_events("wf-success")))
    events = job_events("wf-success")
    assert _statuses(events) == ["STARTING", "INPROGRESS", "COMPLETED"]
    assert events[-1]["source"] == "kiln"
    assert events[-1]["detail"]["ModelArtifacts"]["S3ModelArtifacts"] == uri


def test_compile_error_is_a_client_error(local_stack, service, job_request, upload_model, job_events):
    # GIVEN an archive without any model file
    upload_model("wf-nomodel/model.tar.gz", tar_gz({"README.txt": b"no model here"}))
    # WHEN it is compiled
    service.create(job_request("wf-nomodel"))
    job = local_stack.wait_for("wf-nomodel", timeout=120)
    # THEN it fails with a ClientError reason telling what is wrong, and a FAILED event
    assert job["CompilationJobStatus"] == "FAILED"
    assert job["FailureReason"].startswith("ClientError: InputConfiguration:")
    assert "Traceback" not in job["FailureReason"]
    assert wait_until(lambda: _statuses(job_events("wf-nomodel"))[-1:] == ["FAILED"])
    assert job_events("wf-nomodel")[-1]["detail"]["FailureReason"] == job["FailureReason"]


def test_container_crash_is_a_server_error_decided_by_exit_code(local_stack, service, job_request, upload_model):
    # GIVEN a job compiling a model big enough to be caught mid-build
    from tests.compiler.conftest import randomized_light_model

    upload_model("wf-crash/model.tar.gz",
                 tar_gz({"model.onnx": randomized_light_model("resnet50").SerializeToString()}))
    service.create(job_request("wf-crash", InputConfig={
        "S3Uri": f"s3://{local_stack.outputs['ModelBucket']}/wf-crash/model.tar.gz", "Framework": "ONNX"}))
    assert wait_until(lambda: "stage build: start" in _compiler_log(local_stack, "wf-crash"), timeout=120)
    process = next(p for p in local_stack.runner.processes.values() if '"wf-crash"' in p.env["KILN_JOB"])
    started = time.time()
    # WHEN its container dies (killed, as by the out-of-memory killer)
    os.killpg(process.popen.pid, signal.SIGKILL)
    job = local_stack.wait_for("wf-crash", timeout=60)
    # THEN the job fails at once (the exit code decides, no heartbeat wait) with a ServerError naming it
    assert job["CompilationJobStatus"] == "FAILED"
    assert job["FailureReason"].startswith("ServerError: the compiler container exited with code -9")
    assert time.time() - started < 30


def test_runtime_limit_fails_the_job_and_stops_the_container(local_stack, service, job_request, upload_model,
                                                             start_with_limits):
    # GIVEN a model that takes longer to compile than the runtime limit allows
    from tests.compiler.conftest import randomized_light_model

    upload_model("wf-runtime/model.tar.gz",
                 tar_gz({"model.onnx": randomized_light_model("resnet50").SerializeToString()}))
    request = job_request("wf-runtime", InputConfig={
        "S3Uri": f"s3://{local_stack.outputs['ModelBucket']}/wf-runtime/model.tar.gz", "Framework": "ONNX"})
    # WHEN the workflow runs with MaxRuntimeInSeconds = 4
    start_with_limits(request, pending=60, runtime=4)
    job = local_stack.wait_for("wf-runtime", timeout=120)
    # THEN it fails naming the limit, and no compiler process is left running
    assert job["CompilationJobStatus"] == "FAILED"
    assert "exceeded MaxRuntimeInSeconds (4 s)" in job["FailureReason"]
    assert job["FailureReason"].startswith("ClientError:")
    assert wait_until(lambda: all(p.popen.poll() is not None for p in local_stack.runner.processes.values()
                                  if '"wf-runtime"' in p.env["KILN_JOB"]), timeout=30)


def test_pending_limit_fails_the_job(local_stack, service, job_request, start_with_limits):
    # GIVEN no capacity to start containers
    local_stack.runner.hold = True
    try:
        # WHEN a job waits longer than MaxPendingTimeInSeconds
        start_with_limits(job_request("wf-pending"), pending=3, runtime=60)
        job = local_stack.wait_for("wf-pending", timeout=60)
    finally:
        local_stack.runner.hold = False
    # THEN it fails naming the pending limit
    assert job["CompilationJobStatus"] == "FAILED"
    assert "MaxPendingTimeInSeconds (3 s)" in job["FailureReason"]


@pytest.mark.parametrize("phase", ["before-start", "pending", "compiling"])
def test_stop_ends_stopped_in_every_phase(local_stack, service, job_request, upload_model, job_events, phase):
    # GIVEN a job in the given phase
    name = f"wf-stop-{phase}"
    from tests.compiler.conftest import randomized_light_model

    upload_model(f"{name}/model.tar.gz",
                 tar_gz({"model.onnx": randomized_light_model("resnet50").SerializeToString()}))
    request = job_request(name, InputConfig={"S3Uri": f"s3://{local_stack.outputs['ModelBucket']}/{name}/model.tar.gz",
                                             "Framework": "ONNX"})
    local_stack.runner.hold = phase == "pending"
    try:
        service.create(request)
        if phase == "pending":
            assert wait_until(lambda: any(f'"{name}"' in env["KILN_JOB"] for _, env in local_stack.runner.held))
        if phase == "compiling":
            assert wait_until(lambda: "stage build: start" in _compiler_log(local_stack, name), timeout=120)
        # WHEN it is stopped
        service.stop(name)
    finally:
        local_stack.runner.hold = False
    job = local_stack.wait_for(name, timeout=60)
    # THEN it ends STOPPED, its container is gone, and the events end with STOPPING, STOPPED
    assert job["CompilationJobStatus"] == "STOPPED"
    # (a container whose RunTask raced the stop finds its workflow gone and exits within the token grace)
    assert wait_until(lambda: all(p.popen.poll() is not None for p in local_stack.runner.processes.values()
                                  if f'"{name}"' in p.env["KILN_JOB"]), timeout=45)
    assert wait_until(lambda: _statuses(job_events(name))[-2:] == ["STOPPING", "STOPPED"]), _statuses(job_events(name))
    execution = local_stack.client("stepfunctions").describe_execution(
        executionArn=service.store.get(name)["ExecutionArn"])
    assert wait_until(lambda: local_stack.client("stepfunctions").describe_execution(
        executionArn=execution["executionArn"])["status"] != "RUNNING", timeout=30)


def test_stop_racing_completion_ends_in_exactly_one_terminal_state(local_stack, service, job_request,
                                                                   upload_model, tiny_onnx_archive, job_events):
    # GIVEN a job whose compiler is about to report success
    upload_model("wf-race/model.tar.gz", tiny_onnx_archive)
    service.create(job_request("wf-race"))
    assert wait_until(lambda: "stage package" in _compiler_log(local_stack, "wf-race"), timeout=120)
    # WHEN a stop arrives at the same moment
    try:
        service.stop("wf-race")
    except Exception as exc:  # the job may already be COMPLETED: then stopping is refused
        assert "cannot be stopped" in str(exc)
    job = local_stack.wait_for("wf-race", timeout=60)
    time.sleep(1)
    # THEN exactly one terminal state was recorded, and it stays
    assert job["CompilationJobStatus"] in ("COMPLETED", "STOPPED")
    terminal_events = [s for s in _statuses(job_events("wf-race")) if s in TERMINAL]
    assert terminal_events == [job["CompilationJobStatus"]]
    assert service.describe("wf-race")["CompilationJobStatus"] == job["CompilationJobStatus"]


def test_model_package_input_is_resolved(local_stack, service, job_request, upload_model, tiny_onnx_archive):
    # GIVEN a model package version whose container points at a real model
    uri = upload_model("wf-package/model.tar.gz", tiny_onnx_archive)
    sm = local_stack.client("sagemaker")
    sm.create_model_package_group(ModelPackageGroupName="wf-group")
    arn = sm.create_model_package(
        ModelPackageGroupName="wf-group", ModelApprovalStatus="Approved",
        InferenceSpecification={"Containers": [{"Image": "kiln/placeholder:latest", "ModelDataUrl": uri,
                                                "Framework": "ONNX",
                                                "ModelInput": {"DataInputConfig": '{"x": [1, 8]}'}}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"]
    request = job_request("wf-package")
    del request["InputConfig"]
    request["ModelPackageVersionArn"] = arn
    # WHEN the job is created from the package
    service.create(request)
    job = local_stack.wait_for("wf-package", timeout=300)
    # THEN the package's model was compiled
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    assert job["ModelArtifacts"]["S3ModelArtifacts"].endswith("/model-ml_c4.tar.gz")


def test_transient_step_error_is_retried(local_stack, service, job_request, upload_model, tiny_onnx_archive,
                                         monkeypatch):
    # GIVEN MarkInProgress fails once with a transient error
    calls: list[str] = []
    original = WorkflowSteps.mark_in_progress

    def flaky(self: WorkflowSteps, job: dict[str, Any]) -> dict[str, Any]:
        calls.append(job["CompilationJobName"])
        if calls.count(job["CompilationJobName"]) == 1:
            raise TransientError("ThrottlingException")
        return original(self, job)

    monkeypatch.setattr(WorkflowSteps, "mark_in_progress", flaky)
    upload_model("wf-retry/model.tar.gz", tiny_onnx_archive)
    # WHEN the job runs
    service.create(job_request("wf-retry"))
    job = local_stack.wait_for("wf-retry", timeout=300)
    # THEN the step was retried and the job completed
    assert calls.count("wf-retry") == 2
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]


def test_failed_success_record_does_not_lose_the_job(local_stack, service, job_request, upload_model,
                                                     tiny_onnx_archive, monkeypatch):
    # GIVEN recording success keeps failing (e.g. a bug or a permissions error)
    def broken(self: WorkflowSteps, job: dict[str, Any], *results: Any) -> dict[str, Any]:
        raise RuntimeError("AccessDenied on the job table")

    monkeypatch.setattr(WorkflowSteps, "record_success", broken)
    upload_model("wf-norecord/model.tar.gz", tiny_onnx_archive)
    # WHEN the job's compile succeeds
    service.create(job_request("wf-norecord"))
    job = local_stack.wait_for("wf-norecord", timeout=300)
    # THEN the job is FAILED with a ServerError reason, not left INPROGRESS
    assert job["CompilationJobStatus"] == "FAILED"
    assert job["FailureReason"].startswith("ServerError: RuntimeError: AccessDenied on the job table")


@pytest.mark.slow
def test_job_whose_every_record_fails_is_reconciled_on_describe(local_stack, service, job_request, upload_model,
                                                                monkeypatch):
    # GIVEN neither success nor failure can be recorded by the workflow
    def broken(self: WorkflowSteps, *args: Any) -> dict[str, Any]:
        raise RuntimeError("table unavailable")

    monkeypatch.setattr(WorkflowSteps, "record_failure", broken)
    monkeypatch.setattr(WorkflowSteps, "record_success", broken)
    upload_model("wf-lost/model.tar.gz", tar_gz({"README.txt": b"no model"}))
    # WHEN its execution ends
    service.create(job_request("wf-lost"))
    sfn = local_stack.client("stepfunctions")
    # (RecordFailure retries for about a minute with backoff before the execution gives up)
    assert wait_until(lambda: sfn.describe_execution(
        executionArn=service.store.get("wf-lost")["ExecutionArn"])["status"] == "FAILED", timeout=300)
    # THEN DescribeCompilationJob reports it FAILED instead of running forever
    job = service.describe("wf-lost")
    assert job["CompilationJobStatus"] == "FAILED"
    assert job["FailureReason"].startswith("ServerError: the compilation workflow ended (FAILED)")


def test_a_create_records_its_execution_arn_in_its_one_write(local_stack, service, job_request, upload_model,
                                                             tiny_onnx_archive):
    # GIVEN a valid job request, and the DynamoDB calls of the service's store recorded
    name = "wf-one-write"
    upload_model(f"{name}/model.tar.gz", tiny_onnx_archive)
    calls: list[str] = []
    events = service.store._client.meta.events

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    events.register("before-call.dynamodb", record)
    local_stack.runner.hold = True  # no compiler: the job waits as pending until stopped
    try:
        # WHEN the job is created
        service.create(job_request(name))
    finally:
        events.unregister("before-call.dynamodb", record)
    try:
        # THEN the store wrote once, the transaction that took the job's slot (no second write for the ARN)
        assert calls == ["TransactWriteItems"], calls
        # AND the ARN it recorded is the started execution's, named after the job
        arn = service.store.get(name)["ExecutionArn"]
        execution = local_stack.client("stepfunctions").describe_execution(executionArn=arn)
        assert execution["name"] == name and execution["executionArn"] == arn
        assert service.execution_arn(name) == arn
    finally:
        service.stop(name)
        local_stack.runner.hold = False
    assert local_stack.wait_for(name, timeout=60)["CompilationJobStatus"] == "STOPPED"


def test_gpu_target_runs_on_the_batch_runner(local_stack, service, job_request, upload_model, tiny_onnx_archive):
    # GIVEN a job for an NVIDIA target (the catalog's runner for it is AWS Batch)
    upload_model("wf-gpu/model.tar.gz", tiny_onnx_archive)
    request = job_request("wf-gpu")
    request["OutputConfig"]["TargetDevice"] = "ml_g4dn"
    # WHEN it runs
    service.create(request)
    job = local_stack.wait_for("wf-gpu", timeout=300)
    # THEN the compiler ran as a Batch job (CUDA code generated without a GPU) and the job completed
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    assert job["ModelArtifacts"]["S3ModelArtifacts"].endswith("/model-ml_g4dn.tar.gz")
    batch_jobs = [task for task, p in local_stack.runner.processes.items()
                  if '"wf-gpu"' in p.env["KILN_JOB"]]
    assert batch_jobs and all(":batch:" in task for task in batch_jobs)
