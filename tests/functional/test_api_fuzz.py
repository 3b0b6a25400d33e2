"""Fuzzing Kiln's API from botocore's SageMaker input shapes, in-process (the real resolver over the
embedded stack) and over HTTP (``kiln serve``): never a 5xx, every 4xx a JSON ``{"__type", "message"}``
naming the member at fault, every accepted job terminal.

CI runs a fixed, derandomized budget (``KILN_FUZZ_EXAMPLES`` per test, default below); ``make fuzz``
runs >= 10,000 examples and prints the figures.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from kiln.errors import ResourceNotFound

from tests.conftest import event_for
from tests.functional.fuzzing import Call, Figures, calls, malformed_calls, record

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
NAME_PLACEHOLDER = "fz-name-placeholder"
TERMINAL = ("COMPLETED", "FAILED", "STOPPED")


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    """The run's figures; printed at the end (``make fuzz`` shows them with -s) and written to
    ``KILN_FUZZ_REPORT`` when set."""
    collected = Figures()
    yield collected
    summary = json.dumps(collected.summary(), indent=2)
    print(f"\nAPI fuzz figures:\n{summary}")
    if os.environ.get("KILN_FUZZ_REPORT"):
        with open(os.environ["KILN_FUZZ_REPORT"], "w") as report:
            report.write(summary + "\n")


@pytest.fixture(scope="module")
def valid_requests(local_stack: Any, job_request: Callable[..., dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One valid request per operation, over a stored job of this module (the fuzzed member replaces one)."""
    service = local_stack.kiln.service
    name = "fz-target-job"
    request = job_request(name)
    service.store.create({**request, "CompilationJobArn":
                          f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}",
                          "CompilationJobStatus": "FAILED", "CreationTime": time.time(),
                          "LastModifiedTime": time.time(), "FailureReason": "ClientError: seeded"})
    arn = service.describe(name)["CompilationJobArn"]
    return {
        "CreateCompilationJob": {**job_request(NAME_PLACEHOLDER), "Tags": [{"Key": "fuzz", "Value": "yes"}]},
        "DescribeCompilationJob": {"CompilationJobName": name},
        "ListCompilationJobs": {"MaxResults": 5, "NameContains": "fz", "SortBy": "Name", "SortOrder": "Descending"},
        "StopCompilationJob": {"CompilationJobName": name},
        "DeleteCompilationJob": {"CompilationJobName": "fz-no-such-job"},
        "AddTags": {"ResourceArn": arn, "Tags": [{"Key": "k", "Value": "v"}]},
        "ListTags": {"ResourceArn": arn, "MaxResults": 10},
        "DeleteTags": {"ResourceArn": arn, "TagKeys": ["k"]},
    }


@pytest.fixture(scope="module")
def unique_names() -> Callable[[Call], Call]:
    """Give each create built from the valid request its own job name (so it can be accepted)."""
    counter = itertools.count()

    def rename(call: Call) -> Call:
        if NAME_PLACEHOLDER not in call.body:
            return call
        return Call(call.operation, call.body.replace(NAME_PLACEHOLDER, f"fz-{next(counter)}-{os.getpid()}"),
                    call.content_type, call.target)

    return rename


@pytest.fixture(scope="module")
def over_http(api_server: Any) -> Callable[[Call], tuple[int, str]]:
    """Send a call to ``kiln serve``: (status, body text)."""

    def send(call: Call) -> tuple[int, str]:
        # Header values go on the wire as UTF-8 bytes (http.client only writes latin-1 text).
        headers = {k: v.encode().decode("latin-1") for k, v in call.headers.items()}
        request = urllib.request.Request(api_server.url + "/", data=call.body.encode("utf-8", "surrogatepass"),
                                         method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return send


@pytest.fixture(scope="module")
def in_process(resolve: Callable[..., Any]) -> Callable[[Call], tuple[int, str]]:
    """Hand a call to the real resolver as the API Gateway event it would be: (status, body text)."""

    def send(call: Call) -> tuple[int, str]:
        status, _, body = resolve(event_for("POST", "/", headers=call.headers,
                                            raw=call.body.encode("utf-8", "surrogatepass")))
        return status, json.dumps(body) if body is not None else ""

    return send


def assert_all_terminal(service: Any, names: list[str], stall_s: float = 180) -> None:
    """Every accepted job reaches COMPLETED, FAILED or STOPPED, a failure saying why without internals.

    Jobs queue for the host's compiler slots, so a large run takes long: the wait fails when no job
    has finished for ``stall_s`` (a stuck job), not after a fixed time. A job that a later fuzzed
    DeleteCompilationJob removed had finished (only a finished job can be deleted)."""
    reasons: dict[str, str] = {}

    def finished(name: str) -> bool:
        try:
            job = service.describe(name)
        except ResourceNotFound:
            return True
        if job["CompilationJobStatus"] not in TERMINAL:
            return False
        reasons[name] = job.get("FailureReason", "")
        return True

    pending = set(names)
    last_progress = time.time()
    while pending and time.time() - last_progress < stall_s:
        still = {n for n in pending if not finished(n)}
        if len(still) < len(pending):
            last_progress = time.time()
        pending = still
        time.sleep(0.5)
    stuck = {n: {k: v for k, v in service.store.get(n).items() if k in ("CompilationJobStatus", "StoppingCondition",
                                                                         "OutputConfig", "ExecutionArn")}
             for n in sorted(pending)[:5]}
    assert not pending, f"{len(pending)} accepted jobs not terminal after {stall_s} s without progress, e.g. {stuck}"
    for reason in reasons.values():
        assert not reason or reason.startswith(("ClientError:", "ServerError:")), reason


def _check(figures: Figures, call: Call, response: tuple[int, str]) -> None:
    found = record(figures, call, *response)
    assert not found, f"{call.headers} {call.body[:500]!r} -> {response[0]} {response[1][:500]!r}: {found}"


# -- regressions first (found by the fuzzer: a RecursionError answered 500) --------------------------------------
@pytest.mark.parametrize("depth", [65, 5_000, 100_000])
def test_deeply_nested_body_is_a_serialization_error(depth: int, amz_json: Callable[..., Any],
                                                     resolve: Callable[..., Any]) -> None:
    # GIVEN a body nested thousands of levels deep, at the top and inside a member
    for raw in ("[" * depth + "]" * depth, '{"CompilationJobName": ' + "[" * depth + "]" * depth + "}"):
        # WHEN it reaches the resolver in-process and `kiln serve` over HTTP
        status, _, body = resolve(event_for("POST", "/", headers={"X-Amz-Target": "SageMaker.DescribeCompilationJob",
                                                                   "Content-Type": "application/x-amz-json-1.1"},
                                            raw=raw.encode()))
        http_status, _, http_body = amz_json("SageMaker.DescribeCompilationJob", raw=raw.encode())
        # THEN both answer 400 SerializationException saying why, never 500
        for answer_status, answer in ((status, body), (http_status, http_body)):
            assert answer_status == 400 and answer["__type"] == "SerializationException"
            assert "levels deep" in answer["message"]


def test_request_as_deep_as_the_limit_is_still_parsed(amz_json: Callable[..., Any]) -> None:
    # GIVEN a member nested exactly 64 levels deep (the limit; SageMaker's shapes need far fewer)
    raw = '{"CompilationJobName": ' + "[" * 63 + "]" * 63 + "}"
    # WHEN it is sent / THEN it is parsed and refused by validation, naming the member
    status, _, body = amz_json("SageMaker.DescribeCompilationJob", raw=raw.encode())
    assert status == 400 and body["__type"] == "ValidationException"
    assert "compilationJobName" in body["message"]


@pytest.mark.parametrize("window", [{"CreationTimeAfter": 5.972389743422918e-196},
                                    {"LastModifiedTimeBefore": 1e300, "CreationTimeAfter": -1e300},
                                    {"CreationTimeAfter": 2e9, "CreationTimeBefore": 1e9}])
def test_extreme_time_filters_list_without_error(amz_json: Callable[..., Any], window: dict[str, float]) -> None:
    # GIVEN time filters far outside any job's times, or a reversed window (found by the fuzzer: 500)
    # WHEN jobs are listed with them (raw JSON: botocore cannot even write 1e300 as a timestamp)
    status, _, page = amz_json("SageMaker.ListCompilationJobs", {"MaxResults": 5, **window})
    # THEN the list answers (an empty window lists nothing)
    assert status == 200 and isinstance(page["CompilationJobSummaries"], list)
    if window.get("CreationTimeBefore", 1e12) < window.get("CreationTimeAfter", 0):
        assert page["CompilationJobSummaries"] == []


def test_oversized_body_is_refused_before_parsing(amz_json: Callable[..., Any]) -> None:
    # GIVEN a body over a megabyte (no valid request comes near)
    raw = json.dumps({"CompilationJobName": "a" * (1024 * 1024)}).encode()
    # WHEN it is sent / THEN 413 with a JSON error saying the limit
    status, _, body = amz_json("SageMaker.DescribeCompilationJob", raw=raw)
    assert status == 413 and body["__type"] == "RequestEntityTooLargeException"
    assert "at most 1048576" in body["message"]


# -- generated --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["in_process", "over_http"])
def test_fuzzed_requests(transport: str, request: pytest.FixtureRequest, local_stack: Any, figures: Figures,
                         valid_requests: dict[str, dict[str, Any]], unique_names: Callable[[Call], Call]) -> None:
    # GIVEN requests for all eight operations generated from botocore's input shapes
    send: Callable[[Call], tuple[int, str]] = request.getfixturevalue(transport)
    accepted_before = len(figures.accepted)

    @FUZZ
    @given(calls(valid_requests))
    def run(call: Call) -> None:
        # WHEN each reaches the real resolver (in-process) or `kiln serve` (HTTP)
        call = unique_names(call)
        # THEN the answer keeps the contract
        _check(figures, call, send(call))

    run()
    # AND every job it got accepted ends terminal
    assert_all_terminal(local_stack.kiln.service, figures.accepted[accepted_before:])


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["in_process", "over_http"])
def test_malformed_http(transport: str, request: pytest.FixtureRequest, figures: Figures) -> None:
    # GIVEN bad JSON, non-object bodies, missing/unknown targets, wrong content types, oversized bodies
    send: Callable[[Call], tuple[int, str]] = request.getfixturevalue(transport)

    @settings(FUZZ, max_examples=max(EXAMPLES // 4, 20))
    @given(malformed_calls())
    def run(call: Call) -> None:
        # WHEN each is sent  THEN a 4xx JSON error, never a 5xx (a well-formed body under another
        # content type is served: the JSON 1.1 protocol is told by X-Amz-Target)
        status, text = send(call)
        _check(figures, call, (status, text))
        assert 400 <= status < 500 or (status == 200 and call.body == "{}" and call.operation
                                       and call.content_type != "application/x-amz-json-1.1")

    run()
