"""The API handler on API Gateway proxy events that validate against Powertools' APIGatewayProxyEventModel."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kiln.api import build_resolver
from kiln.local.server import _Context

from tests.conftest import event_for

JSON_11 = "application/x-amz-json-1.1"


def amz(operation: str, body: Any) -> dict[str, Any]:
    return event_for("POST", "/", body, {"X-Amz-Target": f"SageMaker.{operation}", "Content-Type": JSON_11})


def test_proxy_events_validate_for_every_route_shape() -> None:
    # GIVEN requests of every shape the API serves (JSON 1.1, REST with path, query and multi-value query)
    events = [
        amz("ListCompilationJobs", {}),
        event_for("POST", "/compilation-jobs", {"CompilationJobName": "x"}),
        event_for("GET", "/compilation-jobs", query={"SortBy": "Name", "MaxResults": "5"}),
        event_for("DELETE", "/compilation-jobs/j/tags", query=[("TagKeys", "a"), ("TagKeys", "b")]),
        event_for("GET", "/compilation-jobs/j"),
    ]
    # WHEN / THEN each validates (done in event_for) and carries what the resolver reads
    assert events[0]["headers"]["X-Amz-Target"] == "SageMaker.ListCompilationJobs"
    assert events[0]["pathParameters"] is None and events[0]["resource"] == "/"
    assert events[2]["queryStringParameters"] == {"SortBy": "Name", "MaxResults": "5"}
    assert events[3]["multiValueQueryStringParameters"] == {"TagKeys": ["a", "b"]}
    assert events[4]["pathParameters"] == {"proxy": "compilation-jobs/j"}
    assert events[4]["body"] is None and events[1]["isBase64Encoded"] is False


def test_json_protocol_list(resolve: Any) -> None:
    # GIVEN a JSON 1.1 ListCompilationJobs event
    # WHEN it is resolved
    status, headers, body = resolve(amz("ListCompilationJobs", {"MaxResults": 1}))
    # THEN 200 with the JSON 1.1 content type and the output shape
    assert status == 200 and headers["content-type"] == JSON_11
    assert isinstance(body["CompilationJobSummaries"], list)


def test_json_protocol_create_describe_via_handler(resolve: Any, job_request: Any) -> None:
    from kiln.handlers.api import handler

    # GIVEN a create event for a job whose model is missing (the job fails fast)
    name = f"handler-event-{uuid.uuid4().hex[:8]}"
    # WHEN it goes through the Lambda entrypoint, then a describe through the resolver
    response = handler(amz("CreateCompilationJob", job_request(name)), _Context())
    status, _, job = resolve(amz("DescribeCompilationJob", {"CompilationJobName": name}))
    # THEN both succeed and describe names the job
    assert response["statusCode"] == 200 and json.loads(response["body"])["CompilationJobArn"].endswith(name)
    assert status == 200 and job["CompilationJobName"] == name and "FailureReason" in job


@pytest.mark.parametrize(("event", "status", "code", "fragment"), [
    (lambda: amz("DescribeCompilationJob", {"CompilationJobName": "not-there-at-all"}), 400, "ResourceNotFound",
     "not-there-at-all"),
    (lambda: amz("DescribeCompilationJob", {"CompilationJobName": "a_b"}), 400, "ValidationException",
     "compilationJobName"),
    (lambda: amz("DescribeCompilationJob", {}), 400, "ValidationException", "compilationJobName"),
    (lambda: amz("CreateTrainingJob", {}), 400, "UnknownOperationException", "CreateTrainingJob"),
    (lambda: event_for("POST", "/", {}, {"Content-Type": JSON_11}), 400, "UnknownOperationException",
     "X-Amz-Target"),
    (lambda: event_for("POST", "/", raw=b"{broken", headers={"X-Amz-Target": "SageMaker.ListCompilationJobs"}),
     400, "SerializationException", "not valid JSON"),
    (lambda: event_for("GET", "/compilation-jobs", query={"MaxResults": "many"}), 400, "ValidationException",
     "maxResults"),
    (lambda: event_for("GET", "/compilation-jobs/a_b"), 400, "ValidationException", "compilationJobName"),
    (lambda: event_for("PUT", "/compilation-jobs"), 404, "UnknownOperationException", "PUT /compilation-jobs"),
])
def test_errors_map_to_the_wire(resolve: Any, event: Any, status: int, code: str, fragment: str) -> None:
    # GIVEN an event that must fail
    # WHEN it is resolved
    got_status, headers, body = resolve(event())
    # THEN the status, __type and message are SageMaker's JSON 1.1 error form
    assert got_status == status
    assert headers["content-type"] == JSON_11
    assert body["__type"] == code and fragment in body["message"]


def test_rest_list_and_stage_prefix(resolve: Any) -> None:
    # GIVEN a REST list event, with and without the API Gateway stage prefix
    # WHEN they are resolved
    plain = resolve(event_for("GET", "/compilation-jobs", query={"MaxResults": "2", "SortBy": "Name"}))
    staged = resolve(event_for("GET", "/prod/compilation-jobs", query={"MaxResults": "2", "SortBy": "Name"}))
    # THEN both are served as JSON with the same jobs (their status may move on in between)
    assert plain[0] == staged[0] == 200
    assert plain[1]["content-type"] == "application/json"
    names = [[s["CompilationJobName"] for s in answer[2]["CompilationJobSummaries"]] for answer in (plain, staged)]
    assert names[0] == names[1]


def test_handler_never_leaks_internal_errors() -> None:
    # GIVEN a service whose list fails unexpectedly
    class Broken:
        def list(self, request: dict[str, Any]) -> dict[str, Any]:
            raise RuntimeError("secret internal detail")

    app = build_resolver(lambda: Broken())  # type: ignore[arg-type, return-value]
    # WHEN an event reaches it
    response = app.resolve(amz("ListCompilationJobs", {}), _Context())
    # THEN HTTP 500 InternalFailure without the internal message
    body = json.loads(response["body"])
    assert response["statusCode"] == 500 and body["__type"] == "InternalFailure"
    assert "secret" not in body["message"]
