"""Fixtures for workflow tests: Kiln's events captured from the embedded bus, direct executions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kiln.service import job_arn


@pytest.fixture(scope="session")
def job_events(local_stack: Any) -> Callable[[str], list[dict[str, Any]]]:
    """Every ``Compilation Job State Change`` event seen so far for a job, in order.

    A rule on the embedded default bus (source ``kiln``) delivers to an SQS queue, as a
    user's rule would in AWS."""
    sqs = local_stack.client("sqs")
    events = local_stack.client("events")
    queue_url = sqs.create_queue(QueueName="kiln-job-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="kiln-job-events", EventPattern=json.dumps(
        {"source": ["kiln"], "detail-type": ["Compilation Job State Change"]}))
    events.put_targets(Rule="kiln-job-events", Targets=[{"Id": "queue", "Arn": queue_arn}])
    seen: list[dict[str, Any]] = []

    def for_job(name: str) -> list[dict[str, Any]]:
        while True:
            messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=0).get("Messages", [])
            if not messages:
                break
            for message in messages:
                seen.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return [e for e in seen if e["detail"]["CompilationJobName"] == name]

    return for_job


@pytest.fixture
def service(local_stack: Any) -> Any:
    return local_stack.kiln.service


@pytest.fixture
def start_with_limits(local_stack: Any, service: Any) -> Callable[..., None]:
    """Record a job and start its workflow with limits below what the API allows (seconds, not hours)."""

    def start(request: dict[str, Any], *, pending: int, runtime: int) -> None:
        now = time.time()
        job = {**{k: v for k, v in request.items() if k != "Tags"},
               "CompilationJobArn": job_arn("us-east-1", "123456789012", request["CompilationJobName"]),
               "CompilationJobStatus": "STARTING", "CreationTime": now, "LastModifiedTime": now,
               "StoppingCondition": {"MaxRuntimeInSeconds": runtime, "MaxPendingTimeInSeconds": pending}}
        service.store.create(job, extra={"Runner": "fargate"})
        service.start_workflow(job, "fargate", runtime, pending)

    return start


@pytest.fixture
def one_compiler_slot(local_stack: Any) -> Iterator[Any]:
    """Local mode limited to one compiler process at once (restored afterwards); yields the runner."""
    runner = local_stack.runner
    before = runner.max_running
    runner.set_capacity(1)
    runner.peak_running = runner.running()
    yield runner
    runner.set_capacity(before)


def wait_until(predicate: Callable[[], bool], timeout: float = 60, poll: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()
