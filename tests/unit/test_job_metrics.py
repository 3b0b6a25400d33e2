"""Job outcome metrics and the active-job census: what the CloudWatch dashboard and alarms read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kiln import job_metrics
from kiln.events import JobEvents


def _record(status: str, **fields: Any) -> dict[str, Any]:
    return {"CompilationJobName": "j", "CompilationJobArn": "arn:aws:sagemaker:us-east-1:1:compilation-job/j",
            "CompilationJobStatus": status, "CreationTime": 1000.0, "CompilationEndTime": 1042.5, **fields}


@pytest.mark.parametrize(("status", "reason", "names"), [
    ("COMPLETED", "", ["JobsCompleted", "JobDurationSeconds"]),
    ("FAILED", "ClientError: InputConfiguration: no model", ["JobsFailed", "JobDurationSeconds"]),
    ("FAILED", "ServerError: the compiler container exited with code 137",
     ["JobsFailed", "JobsFailedServerError", "JobDurationSeconds"]),
    ("STOPPED", "", ["JobsStopped", "JobDurationSeconds"]),
    ("INPROGRESS", "", []),
])
def test_outcome_metrics_per_terminal_status(status: str, reason: str, names: list[str]) -> None:
    # GIVEN a job record in a status WHEN its outcome metrics are taken
    metrics = job_metrics.outcome_metrics(_record(status, FailureReason=reason))
    # THEN terminal jobs count once by status (ServerErrors apart) with their duration; active ones not at all
    assert [m[0] for m in metrics] == names
    if names:
        assert metrics[-1] == ("JobDurationSeconds", "Seconds", 42.5)


def test_overdue_is_past_pending_plus_runtime_plus_grace() -> None:
    # GIVEN a job with 60 s pending and 100 s runtime limits, created at t=1000
    record = _record("INPROGRESS", StoppingCondition={"MaxRuntimeInSeconds": 100, "MaxPendingTimeInSeconds": 60})
    grace = job_metrics.OVERDUE_GRACE_SECONDS
    # WHEN it is checked just before and just after its limits and the grace THEN only the latter is overdue
    assert not job_metrics.is_overdue(record, now=1000 + 160 + grace - 1)
    assert job_metrics.is_overdue(record, now=1000 + 160 + grace + 1)


@pytest.mark.parametrize(("exit_code", "stop_code", "failed"), [
    (0, "EssentialContainerExited", False), (1, "EssentialContainerExited", True), (137, "", True),
    (None, "TaskFailedToStart", True), (143, "UserInitiated", False), (None, "UserInitiated", False),
])
def test_container_failures(exit_code: int | None, stop_code: str, failed: bool) -> None:
    # GIVEN a stopped compiler container WHEN it is classified THEN abnormal ends count, Kiln's own stops do not
    assert job_metrics.container_failed(exit_code, stop_code) is failed


def test_emit_writes_one_emf_record(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN metrics enabled (as in Lambda) and a handler's own metric pending (the API's Requests)
    from aws_lambda_powertools import Metrics

    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    handler_metrics = Metrics(namespace="Kiln", service="kiln-api")
    handler_metrics.add_metric(name="Requests", unit="Count", value=1)
    # WHEN two metrics are emitted
    job_metrics.emit([("JobsFailed", "Count", 1), ("JobDurationSeconds", "Seconds", 3.5)])
    # THEN stdout holds one CloudWatch EMF record with both, in the Kiln namespace
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "Kiln"
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {"JobsFailed": "Count",
                                                                   "JobDurationSeconds": "Seconds"}
    assert record["JobsFailed"] == [1.0] and record["JobDurationSeconds"] == [3.5]
    assert directive["Dimensions"] == [["service"]] and record["service"] == job_metrics.SERVICE
    # AND the handler's pending metric was neither taken nor dropped
    assert "Requests" not in record and list(handler_metrics.metric_set) == ["Requests"]
    handler_metrics.clear_metrics()


class _Bus:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.entries += Entries
        return {"FailedEntryCount": 0, "Entries": [{}]}


def test_every_terminal_status_change_emits_its_outcome_once() -> None:
    # GIVEN job events with a metrics sink
    emitted: list[list[job_metrics.Metric]] = []
    events = JobEvents(_Bus(), emit_metrics=emitted.append)
    # WHEN a job goes STARTING -> INPROGRESS -> FAILED
    for status in ("STARTING", "INPROGRESS"):
        events.state_changed(_record(status))
    events.state_changed(_record("FAILED", FailureReason="ServerError: boom"))
    # THEN only the terminal change emitted metrics
    assert [[m[0] for m in metrics] for metrics in emitted if metrics] == [
        ["JobsFailed", "JobsFailedServerError", "JobDurationSeconds"]]


def test_a_failing_metrics_sink_never_fails_the_status_change() -> None:
    # GIVEN a sink that raises WHEN a terminal change is published THEN the event still goes out
    def broken(metrics: list[job_metrics.Metric]) -> None:
        raise RuntimeError("stdout closed")

    bus = _Bus()
    JobEvents(bus, emit_metrics=broken).state_changed(_record("COMPLETED"))
    assert len(bus.entries) == 1
