"""Fixtures for workflow tests: Kiln's events captured from the embedded bus, direct executions."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kiln.service import job_arn

from tests.conftest import tar_gz


@pytest.fixture(scope="session")
def job_events(local_stack: Any) -> Callable[[str], list[dict[str, Any]]]:
    """Every ``Compilation Job State Change`` event seen so far for a job, in the order of the changes.

    Ordered by the change's time (``detail.LastModifiedTime``), as docs/events.md tells consumers to:
    the API and a workflow step publish independently, so a stop racing a job's start can deliver
    STOPPING before the (earlier) INPROGRESS.

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
        return sorted((e for e in seen if e["detail"]["CompilationJobName"] == name),
                      key=lambda e: e["detail"]["LastModifiedTime"])

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


def compiler_log(stack: Any, name: str) -> str:
    """The compiler process's log of a job (local runner)."""
    from pathlib import Path

    path = Path(stack.work_dir) / "containers" / name / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def compiler_fault(local_stack: Any) -> Iterator[Callable[[str, str], None]]:
    """``compiler_fault(job_name, "hang@build")``: the job's compiler process runs with that TEST-ONLY
    ``KILN_FAULT`` (see kiln_compiler.faults)."""
    planned: list[str] = []

    def plan(name: str, spec: str) -> None:
        local_stack.runner.faults[name] = spec
        planned.append(name)

    yield plan
    for name in planned:
        local_stack.runner.faults.pop(name, None)


@dataclass
class AwsError:
    """An error botocore raises in this process for matching calls (the handlers run in-process)."""

    operation: str
    code: str
    times: int | None  # None: every matching call
    when: Callable[[dict[str, Any]], bool]
    status: int = 400
    reasons: list[str] | None = None
    raised: int = 0


@pytest.fixture
def aws_error(monkeypatch: pytest.MonkeyPatch) -> Callable[..., AwsError]:
    """``aws_error("TransactWriteItems", "ProvisionedThroughputExceededException", times=1, when=...)``: the
    next matching calls of any boto3 client in this process fail as AWS would answer, after botocore's own
    retries (so the caller's error handling is what runs)."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    faults: list[AwsError] = []
    original = BaseClient._make_api_call

    def make_api_call(self: Any, operation_name: str, params: dict[str, Any]) -> Any:
        for fault in faults:
            if fault.operation == operation_name and (fault.times is None or fault.raised < fault.times) \
                    and fault.when(params):
                fault.raised += 1
                response: dict[str, Any] = {
                    "Error": {"Code": fault.code, "Message": f"injected {fault.code}"},
                    "ResponseMetadata": {"HTTPStatusCode": fault.status}}
                if fault.reasons is not None:
                    response["CancellationReasons"] = [{"Code": r} for r in fault.reasons]
                raise ClientError(response, operation_name)
        return original(self, operation_name, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", make_api_call)

    def add(operation: str, code: str, *, times: int | None = None,
            when: Callable[[dict[str, Any]], bool] = lambda params: True, status: int = 400,
            reasons: list[str] | None = None) -> AwsError:
        fault = AwsError(operation, code, times, when, status, reasons)
        faults.append(fault)
        return fault

    return add


@dataclass
class Snapshot:
    """What a fault-injection check compares: every S3 key before the job ran."""

    keys: set[str]


def counter_offset(service: Any) -> int:
    """The active-job counter minus the number of jobs listed STARTING, INPROGRESS or STOPPING."""
    active = sum(len(all_with_status(service, s)) for s in ("STARTING", "INPROGRESS", "STOPPING"))
    return int(service.store.active_jobs()) - active


def s3_keys(stack: Any) -> set[str]:
    """``bucket/key`` of every object in the embedded S3."""
    s3 = stack.client("s3")
    found: set[str] = set()
    for bucket in (b["Name"] for b in s3.list_buckets()["Buckets"]):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found.update(f"{bucket}/{o['Key']}" for o in page.get("Contents", []))
    return found


@pytest.fixture
def contained(local_stack: Any, service: Any) -> Callable[..., dict[str, Any]]:
    """``contained(name, snapshot, status=..., reason_prefix=...)``: wait for the job to end, then check what
    every fault must leave: the expected terminal state and FailureReason class, no compiler process of the
    job running, no S3 object written outside the job's output prefix, and the active-job counter moved
    equals the number of jobs listed active (so this job's slot was taken and released exactly once)."""

    def check(name: str, before: Snapshot, *, status: str, reason_prefix: str = "",
              timeout: float = 180) -> dict[str, Any]:
        job = local_stack.wait_for(name, timeout=timeout)
        assert job["CompilationJobStatus"] == status, (job["CompilationJobStatus"], job["FailureReason"])
        if reason_prefix:
            assert job["FailureReason"].startswith(reason_prefix), job["FailureReason"]
        assert "Traceback" not in job["FailureReason"] and str(local_stack.work_dir) not in job["FailureReason"]
        assert wait_until(lambda: all(p.popen.poll() is not None for p in local_stack.runner.processes.values()
                                      if f'"{name}"' in p.env.get("KILN_JOB", "")), timeout=45), \
            f"a compiler process of {name} is still running"
        output = job["OutputConfig"]["S3OutputLocation"].removeprefix("s3://").rstrip("/") + "/"
        written = s3_keys(local_stack) - before.keys
        assert all(key.startswith(output) for key in written), sorted(written)
        assert wait_until(lambda: counter_offset(service) == 0, timeout=10), "the active-job counter does not match the active jobs"
        return job

    return check


def all_with_status(service: Any, status: str) -> list[str]:
    names: list[str] = []
    request: dict[str, Any] = {"StatusEquals": status, "MaxResults": 100}
    while True:
        page = service.list(request)
        names += [s["CompilationJobName"] for s in page["CompilationJobSummaries"]]
        if not page.get("NextToken"):
            return names
        request["NextToken"] = page["NextToken"]


@pytest.fixture
def snapshot(local_stack: Any, service: Any) -> Callable[[], Snapshot]:
    """Take a :class:`Snapshot` (after the test uploaded its model, before the job runs)."""
    return lambda: Snapshot(s3_keys(local_stack))


def dense_chain_onnx(dims: tuple[int, ...], seed: int = 0) -> bytes:
    """A real ONNX network of MatMul -> Add -> Relu layers ``dims[0] -> dims[1] -> ...``: one tunable kernel per
    layer (distinct shapes are distinct workloads, so a test's kernels have no records from earlier tests)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, last = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        weights += [numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"W{i}"),
                    numpy_helper.from_array(rng.standard_normal(b).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [last, f"W{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"z{i}"]),
                  helper.make_node("Relu", [f"z{i}"], [f"y{i}"])]
        last = f"y{i}"
    graph = helper.make_graph(nodes, "dense_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, dims[-1]])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return tar_gz({"model.onnx": model.SerializeToString()})


@pytest.fixture
def compiler_slots(local_stack: Any) -> Iterator[Callable[[int], None]]:
    """``compiler_slots(n)``: local mode runs up to n compiler processes at once (restored afterwards)."""
    runner = local_stack.runner
    before = runner.max_running
    yield runner.set_capacity
    runner.set_capacity(before)


@pytest.fixture(scope="session")
def qdq_small_cnn_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """An archive holding the QDQ-quantized small CNN (onnxruntime's quantize_static) as model.onnx."""
    from kiln_compiler.samples import quantize_qdq

    from tests.compiler.conftest import small_cnn

    model = quantize_qdq(small_cnn(), tmp_path_factory.mktemp("qdq_archive"))
    return tar_gz({"model.onnx": model.SerializeToString()})
