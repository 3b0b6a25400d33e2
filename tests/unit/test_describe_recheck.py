"""DescribeCompilationJob asks Step Functions whether an active job's execution ended (without
recording a result) at most once per ``execution_recheck_seconds`` (ADR 0037). botocore's Stubber
stands in for Step Functions and fails on any call it was not told to expect."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from kiln.service import CompilationJobService

ARN = "arn:aws:states:us-east-1:123456789012:execution:kiln-compilation-job:poll-me"


class _OneJobStore:
    """The store, holding one INPROGRESS job whose workflow runs."""

    def get(self, name: str) -> dict[str, Any]:
        now = time.time()
        return {"CompilationJobName": name,
                "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}",
                "CompilationJobStatus": "INPROGRESS", "RoleArn": "arn:aws:iam::123456789012:role/kiln-job",
                "InputConfig": {"S3Uri": "s3://models/m.tar.gz", "Framework": "ONNX"},
                "OutputConfig": {"S3OutputLocation": "s3://artifacts/out", "TargetDevice": "ml_c5"},
                "StoppingCondition": {"MaxRuntimeInSeconds": 900}, "CreationTime": now, "LastModifiedTime": now,
                "ExecutionArn": ARN}


def _service(sfn: Any, recheck: float) -> CompilationJobService:
    return CompilationJobService(store=_OneJobStore(), catalog=None, sfn=sfn, events=None,  # type: ignore[arg-type]
                                 containers=None, state_machine_arn="", region="us-east-1",
                                 account="123456789012", execution_recheck_seconds=recheck)


def _running() -> dict[str, Any]:
    return {"executionArn": ARN, "stateMachineArn": ARN.replace(":execution:", ":stateMachine:").rsplit(":", 1)[0],
            "status": "RUNNING", "startDate": datetime.now(UTC)}


def test_a_polled_running_job_asks_step_functions_once_per_interval() -> None:
    # GIVEN Step Functions expecting exactly two DescribeExecution calls for the job's execution
    sfn = boto3.client("stepfunctions", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    service = _service(sfn, recheck=0.5)
    with Stubber(sfn) as stub:
        for _ in range(2):
            stub.add_response("describe_execution", _running(), {"executionArn": ARN})
        # WHEN a client describes the job five times within the interval
        statuses = [service.describe("poll-me")["CompilationJobStatus"] for _ in range(5)]
        # THEN the job is INPROGRESS each time, and Step Functions was asked once
        assert statuses == ["INPROGRESS"] * 5
        with pytest.raises(AssertionError):  # the second response is still waiting
            stub.assert_no_pending_responses()
        # WHEN the interval has passed
        time.sleep(0.6)
        service.describe("poll-me")
        # THEN it is asked again
        stub.assert_no_pending_responses()


def test_recheck_zero_asks_every_time() -> None:
    # GIVEN no interval
    sfn = boto3.client("stepfunctions", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    service = _service(sfn, recheck=0)
    with Stubber(sfn) as stub:
        for _ in range(3):
            stub.add_response("describe_execution", _running(), {"executionArn": ARN})
        # WHEN the job is described three times
        for _ in range(3):
            service.describe("poll-me")
        # THEN each Describe asked Step Functions
        stub.assert_no_pending_responses()


def test_the_execution_arn_is_known_before_the_execution_starts() -> None:
    # GIVEN services over state machines in two partitions, and one with no state machine ARN
    def arn_of(machine: str) -> str | None:
        service = CompilationJobService(store=_OneJobStore(), catalog=None, sfn=None, events=None,  # type: ignore[arg-type]
                                        containers=None, state_machine_arn=machine, region="us-east-1",
                                        account="123456789012")
        return service.execution_arn("poll-me")

    # WHEN each names the execution of job "poll-me" THEN it is Step Functions' ARN for that name (none without one)
    assert arn_of(ARN.replace(":execution:", ":stateMachine:").rsplit(":", 1)[0]) == ARN
    assert (arn_of("arn:aws-us-gov:states:us-gov-west-1:123456789012:stateMachine:kiln")
            == "arn:aws-us-gov:states:us-gov-west-1:123456789012:execution:kiln:poll-me")
    assert arn_of("") is None
