"""Fault-injection matrix: each fault, in each phase, on moto with the real state machine, the real
handlers in-process and the real compiler process (faults inside it through the TEST-ONLY
``KILN_FAULT``, kiln_compiler.faults; AWS faults through botocore in this process).

Every scenario checks what ``contained`` checks: the job's terminal state and FailureReason class,
no compiler process left running, nothing written outside the job's output prefix, and the
active-job counter equal to the jobs still active. docs/reliability.md is this matrix as a table.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kiln.workflow import WorkflowSteps
from moto.core.exceptions import JsonRESTError

from tests.workflow.conftest import all_with_status, compiler_log, wait_until


def _statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["detail"]["CompilationJobStatus"] for e in events]


@pytest.fixture
def tiny_job(local_stack: Any, job_request: Any, upload_model: Any, tiny_onnx_archive: bytes) -> Any:
    """``tiny_job(name, **overrides)``: the tiny ONNX model uploaded for ``name``; its create request."""

    def make(name: str, **overrides: Any) -> dict[str, Any]:
        upload_model(f"{name}/model.tar.gz", tiny_onnx_archive)
        return dict(job_request(name, **overrides))

    return make


# -- faults inside the compiler container ------------------------------------------------------

@pytest.mark.parametrize(("name", "fault", "status", "reason"), [
    ("fm-crash", "crash@build", "FAILED", "ServerError: the compiler container exited with code -9"),
    ("fm-oom-killed", "exit=137@build", "FAILED", "ServerError: the compiler container exited with code 137"),
    ("fm-oom", "oom@load", "FAILED", "ServerError: the compiler ran out of memory"),
    ("fm-silent-exit", "exit=0@unpack", "FAILED",
     "ServerError: the compiler container exited without reporting a result"),
    ("fm-garbage", "garbage@package", "FAILED", "ServerError: the compiler reported success without an artifact"),
    ("fm-s3-slowdown-read", "s3=SlowDown:503@download", "FAILED",
     "ServerError: S3 kept failing while reading the model artifact"),
    ("fm-s3-denied-read", "s3=AccessDenied:403@download", "FAILED",
     "ClientError: InputConfiguration: cannot read the model artifact"),
    ("fm-s3-slowdown-retried", "s3=SlowDown:503@download*2", "COMPLETED", ""),
])
def test_compiler_fault_ends_the_job_in_the_right_state(local_stack, service, tiny_job, compiler_fault, snapshot,
                                                        contained, name, fault, status, reason):
    # GIVEN a job whose compiler process meets the fault (crash, OOM, silent exit, garbage, S3 errors)
    request = tiny_job(name)
    compiler_fault(name, fault)
    before = snapshot()
    # WHEN it runs
    service.create(request)
    # THEN it ends in the expected state with a reason of the right class, and nothing is left behind
    job = contained(name, before, status=status, reason_prefix=reason)
    if fault == "exit=137@build":
        assert "killed (SIGKILL), most often for running out of memory" in job["FailureReason"]
    if status == "COMPLETED":  # botocore retried the S3 throttling; the fault really fired
        assert compiler_log(local_stack, name).count("fault s3=SlowDown:503 fires") == 2


@pytest.mark.parametrize(("name", "fault", "output", "reason"), [
    ("fm-upload-denied", "s3=AccessDenied:403@upload", None,
     "ClientError: OutputConfiguration: cannot write the compiled model"),
    ("fm-kms-denied", "s3=KMS.AccessDeniedException:403@upload", {"KmsKeyId": "alias/not-yours"},
     "ClientError: OutputConfiguration: cannot write the compiled model"),
    ("fm-no-bucket", "", {"S3OutputLocation": "s3://kiln-no-such-bucket/out"},
     "ClientError: OutputConfiguration: cannot write the compiled model"),
])
@pytest.mark.slow
def test_output_faults_are_client_errors(local_stack, service, tiny_job, compiler_fault, snapshot, contained,
                                         name, fault, output, reason):
    # GIVEN a job whose artifact cannot be written: the role is denied, the KMS key is denied, the
    # output bucket does not exist (the last is real: moto's S3 has no such bucket)
    request = tiny_job(name)
    request["OutputConfig"] = {**request["OutputConfig"], **(output or {})}
    if fault:
        compiler_fault(name, fault)
    before = snapshot()
    # WHEN it compiles and uploads
    service.create(request)
    # THEN it fails with a ClientError that says what to check, and nothing was written anywhere
    job = contained(name, before, status="FAILED", reason_prefix=reason)
    assert "KmsKeyId" in job["FailureReason"] and "RoleArn" in job["FailureReason"]


# -- limits -------------------------------------------------------------------------------------

def test_hang_hits_the_runtime_limit(local_stack, tiny_job, compiler_fault, snapshot, contained, start_with_limits):
    # GIVEN a compiler that hangs in the build (heartbeats go on)
    request = tiny_job("fm-hang")
    compiler_fault("fm-hang", "hang@build")
    before = snapshot()
    # WHEN the job runs with MaxRuntimeInSeconds = 8
    start_with_limits(request, pending=60, runtime=8)
    # THEN it fails naming the limit, as a ClientError, and the container is gone
    contained("fm-hang", before, status="FAILED",
              reason_prefix="ClientError: the compilation exceeded MaxRuntimeInSeconds (8 s)")


def test_lost_task_stopped_event_ends_at_the_pending_limit(local_stack, tiny_job, compiler_fault, snapshot,
                                                           contained, start_with_limits, monkeypatch):
    # GIVEN a compiler that is killed, and the task-stopped event that would tell the workflow is lost
    request = tiny_job("fm-lost-event")
    compiler_fault("fm-lost-event", "crash@load")
    deliver = local_stack.runner.on_exit
    lost: list[dict[str, str]] = []

    def drop_this_jobs(env: dict[str, str], code: int | None, reason: str) -> None:
        if '"fm-lost-event"' in env.get("KILN_JOB", ""):
            lost.append(env)
            return
        deliver(env, code, reason)

    monkeypatch.setattr(local_stack.runner, "on_exit", drop_this_jobs)
    before = snapshot()
    # WHEN the job runs with MaxPendingTimeInSeconds = 8 (the heartbeat timeout)
    start_with_limits(request, pending=8, runtime=120)
    # THEN the missing heartbeats end it at the pending limit instead of leaving it INPROGRESS
    contained("fm-lost-event", before, status="FAILED",
              reason_prefix="ClientError: the compiler container did not start, or stopped responding, "
                            "within MaxPendingTimeInSeconds (8 s)")
    assert lost, "the stop event was not dropped: the scenario did not happen"


@pytest.mark.parametrize(("name", "fault", "status"), [
    ("fm-twice-crash", "crash@load", "FAILED"),
    ("fm-twice-ok", "", "COMPLETED"),
])
def test_task_stopped_event_delivered_twice(local_stack, service, tiny_job, compiler_fault, snapshot, contained,
                                            job_events, monkeypatch, name, fault, status):
    # GIVEN every task-stopped event of the job is delivered twice (EventBridge is at-least-once)
    request = tiny_job(name)
    if fault:
        compiler_fault(name, fault)
    deliver = local_stack.runner.on_exit
    deliveries: list[int | None] = []

    def twice(env: dict[str, str], code: int | None, reason: str) -> None:
        for _ in range(2 if f'"{name}"' in env.get("KILN_JOB", "") else 1):
            deliveries.append(code)
            deliver(env, code, reason)

    monkeypatch.setattr(local_stack.runner, "on_exit", twice)
    before = snapshot()
    # WHEN the job runs
    service.create(request)
    # THEN it ends once, in the state the first delivery (or the compiler's report) decided
    job = contained(name, before, status=status,
                    reason_prefix="ServerError: the compiler container exited with code -9" if fault else "")
    # (the exit hook runs on the process's waiter thread; on a loaded host it can trail the job's end)
    assert wait_until(lambda: len(deliveries) == 2, timeout=180), deliveries
    assert wait_until(lambda: _statuses(job_events(name))[-1:] == [status])
    assert [s for s in _statuses(job_events(name)) if s in ("COMPLETED", "FAILED", "STOPPED")] == [status]
    assert service.describe(name)["CompilationJobStatus"] == job["CompilationJobStatus"]


# -- StopCompilationJob in every phase of INPROGRESS -----------------------------------------------

@pytest.mark.parametrize("stage", ["credentials", "download", "unpack", "build", "upload"])
def test_stop_in_every_phase(local_stack, service, tiny_job, compiler_fault, snapshot, contained, job_events,
                             stage):
    # GIVEN a job held in a phase: before download (credentials), while downloading, after it
    # (unpacking), while building, while uploading
    name = f"fm-stop-{stage}"
    request = tiny_job(name)
    compiler_fault(name, f"hang@{stage}")
    before = snapshot()
    service.create(request)
    assert wait_until(lambda: f"fault hang@{stage} fires" in compiler_log(local_stack, name), timeout=180)
    # WHEN it is stopped
    service.stop(name)
    # THEN it ends STOPPED, its container is gone, and the events end STOPPING, STOPPED
    contained(name, before, status="STOPPED")
    assert wait_until(lambda: _statuses(job_events(name))[-2:] == ["STOPPING", "STOPPED"])


# -- faults of the AWS services around the workflow ---------------------------------------------

def test_lambda_step_raising_is_a_server_error(local_stack, service, tiny_job, snapshot, contained, monkeypatch):
    # GIVEN the MarkInProgress step raises (a bug, a missing permission)
    def broken(self: WorkflowSteps, job: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("AccessDeniedException on the job table")

    monkeypatch.setattr(WorkflowSteps, "mark_in_progress", broken)
    request = tiny_job("fm-step-raises")
    before = snapshot()
    # WHEN the job runs
    service.create(request)
    # THEN it fails with a ServerError naming the error (not retried: it is not transient), no container ran
    contained("fm-step-raises", before, status="FAILED",
              reason_prefix="ServerError: RuntimeError: AccessDeniedException on the job table")
    assert not [p for p in local_stack.runner.processes.values() if '"fm-step-raises"' in p.env["KILN_JOB"]]


class _Throttled(JsonRESTError):
    code = 429

    def __init__(self) -> None:
        super().__init__("TooManyRequestsException", "Rate Exceeded.")


@pytest.mark.parametrize(("name", "times", "status", "reason"), [
    ("fm-lambda-throttled-once", 1, "COMPLETED", ""),
    ("fm-lambda-throttled", None, "FAILED", "ServerError: Lambda.TooManyRequestsException"),
])
def test_lambda_throttling(local_stack, service, tiny_job, snapshot, contained, monkeypatch, name, times, status,
                           reason):
    # GIVEN Lambda throttles the MarkInProgress invocations of the job (once, or every time)
    from moto.awslambda.models import LambdaFunction

    invoke = LambdaFunction._invoke_lambda
    throttled: list[int] = []

    def throttling(self: Any, event: Any = None) -> Any:
        text = event if isinstance(event, str) else json.dumps(event)
        if f'"{name}"' in text and '"MarkInProgress"' in text and (times is None or len(throttled) < times):
            throttled.append(1)
            raise _Throttled()
        return invoke(self, event)

    monkeypatch.setattr(LambdaFunction, "_invoke_lambda", throttling)
    request = tiny_job(name)
    before = snapshot()
    # WHEN the job runs
    service.create(request)
    # THEN the state machine retries the throttled step: a passing throttle completes the job, a
    # lasting one fails it with a ServerError after the retries
    contained(name, before, status=status, reason_prefix=reason)
    assert throttled


def _to_status(status: str) -> Any:
    """Matches DynamoDB transactions that move a job to ``status``."""
    return lambda params: any(
        status in item.get("Update", {}).get("ExpressionAttributeValues", {}).values()
        for item in params.get("TransactItems", []))


@pytest.mark.parametrize(("name", "code", "reasons"), [
    ("fm-ddb-throughput", "ProvisionedThroughputExceededException", None),
    ("fm-ddb-conflict", "TransactionCanceledException", ["TransactionConflict", "None"]),
])
def test_dynamodb_throttling_and_conflicts_are_retried(local_stack, service, tiny_job, snapshot, contained,
                                                       aws_error, name, code, reasons):
    # GIVEN DynamoDB refuses the first write of INPROGRESS and of COMPLETED (throughput exceeded after
    # botocore's retries, or a transaction conflict)
    marks = aws_error("TransactWriteItems", code, times=1, when=_to_status("INPROGRESS"), reasons=reasons)
    records = aws_error("TransactWriteItems", code, times=1, when=_to_status("COMPLETED"), reasons=reasons)
    request = tiny_job(name)
    before = snapshot()
    # WHEN the job runs
    service.create(request)
    # THEN the steps are retried and the job completes, counted once
    contained(name, before, status="COMPLETED")
    assert (marks.raised, records.raised) == (1, 1)


def test_start_execution_failing_fails_the_job(local_stack, service, tiny_job, snapshot, contained, aws_error):
    # GIVEN Step Functions refuses StartExecution
    aws_error("StartExecution", "ExecutionLimitExceeded", when=lambda p: p.get("name") == "fm-no-execution")
    request = tiny_job("fm-no-execution")
    before = snapshot()
    # WHEN the job is created
    service.create(request)
    # THEN it is FAILED at once with a ServerError naming the refusal, and its slot is released
    contained("fm-no-execution", before, status="FAILED",
              reason_prefix="ServerError: the compilation workflow could not be started (ExecutionLimitExceeded)")


def test_model_package_deleted_mid_flight(local_stack, service, job_request, upload_model, tiny_onnx_archive,
                                          snapshot, contained, aws_error, monkeypatch):
    # GIVEN a job created from a model package version
    uri = upload_model("fm-package/model.tar.gz", tiny_onnx_archive)
    sm = local_stack.client("sagemaker")
    sm.create_model_package_group(ModelPackageGroupName="fm-group")
    arn = sm.create_model_package(
        ModelPackageGroupName="fm-group", ModelApprovalStatus="Approved",
        InferenceSpecification={"Containers": [{"Image": "kiln/placeholder:latest", "ModelDataUrl": uri,
                                                "Framework": "ONNX"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]})["ModelPackageArn"]
    request = job_request("fm-package")
    del request["InputConfig"]
    request["ModelPackageVersionArn"] = arn
    # AND the package is deleted after the job was accepted, before the workflow resolves it (moto has no
    # DeleteModelPackage: from then on SageMaker answers DescribeModelPackage as for a missing package)
    mark = WorkflowSteps.mark_in_progress
    deleted: list[Any] = []

    def delete_then_mark(self: WorkflowSteps, job: dict[str, Any]) -> dict[str, Any]:
        if job["CompilationJobName"] == "fm-package" and not deleted:
            deleted.append(aws_error("DescribeModelPackage", "ValidationException",
                                     when=lambda params: params.get("ModelPackageName") == arn))
        return mark(self, job)

    monkeypatch.setattr(WorkflowSteps, "mark_in_progress", delete_then_mark)
    before = snapshot()
    # WHEN the job runs
    service.create(request)
    # THEN it fails with a ClientError naming the package, without starting a compiler
    contained("fm-package", before, status="FAILED",
              reason_prefix=f"ClientError: ModelPackageVersionArn: could not describe {arn} (ValidationException)")
    assert deleted and deleted[0].raised == 1
    assert not [p for p in local_stack.runner.processes.values() if '"fm-package"' in p.env["KILN_JOB"]]


# -- what operators see -------------------------------------------------------------------------

def test_census_counts_active_jobs_and_finds_those_past_their_limits(local_stack, service, job_request):
    # GIVEN a STARTING job created long ago with small limits (its workflow never ran: it is stuck)
    import time

    from kiln.handlers.workflow import handler
    from kiln.local.moto_patches import _Context
    from kiln.service import job_arn

    now = time.time()
    stuck = {**job_request("fm-stuck"), "CompilationJobArn": job_arn("us-east-1", "123456789012", "fm-stuck"),
             "CompilationJobStatus": "STARTING", "CreationTime": now - 3600, "LastModifiedTime": now - 3600,
             "StoppingCondition": {"MaxRuntimeInSeconds": 60, "MaxPendingTimeInSeconds": 60}}
    service.store.create(stuck, extra={"Runner": "fargate"})
    try:
        # WHEN the scheduled census step runs
        census = handler({"Step": "Census"}, _Context())
        # THEN it counts the active jobs by status from the index, and names the overdue one
        assert census["ByStatus"]["STARTING"] >= 1
        assert "fm-stuck" in census["Overdue"]
        # AND its counts per status are what ListCompilationJobs lists (other jobs of the session may move)
        active = ("STARTING", "INPROGRESS", "STOPPING")
        assert wait_until(lambda: {s: handler({"Step": "Census"}, _Context())["ByStatus"].get(s, 0) for s in active}
                          == {s: len(all_with_status(service, s)) for s in active}, timeout=10)
        assert ["JobsStarting", "Count", census["ByStatus"]["STARTING"]] in [list(m) for m in census["Metrics"]]
    finally:
        service.record_failure("fm-stuck", "ServerError: test cleanup")


@pytest.mark.parametrize(("exit_code", "stop_code", "counted"), [(137, "EssentialContainerExited", True),
                                                                 (0, "EssentialContainerExited", False),
                                                                 (143, "UserInitiated", False)])
def test_container_stopped_hook_counts_failed_containers(local_stack, monkeypatch, capsys, exit_code, stop_code,
                                                         counted):
    # GIVEN metrics enabled (as in Lambda; local mode turns them off) and an ECS task-stopped event of a compiler
    # container
    from kiln.handlers.workflow import container_stopped
    from kiln.local.moto_patches import _Context

    event = {"source": "aws.ecs", "detail-type": "ECS Task State Change",
             "detail": {"lastStatus": "STOPPED", "stopCode": stop_code, "stoppedReason": "test",
                        "containers": [{"name": "compiler", "exitCode": exit_code}], "overrides": {}}}
    capsys.readouterr()
    # WHEN the hook handles it
    with local_stack.reconfigured(emit_metrics=True):
        container_stopped(event, _Context())
    # THEN an abnormal end is counted as CompilerContainerFailures, a clean exit or Kiln's own stop is not
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    assert [r.get("CompilerContainerFailures") for r in records] == ([[1.0]] if counted else [])
