"""What operators measure about jobs: outcome metrics of the workflow's record steps and a census of
active jobs (by status, and those running past their limits). The names are the ones the CDK
dashboard and alarms read (kiln_infra.monitoring); the handlers emit them with Powertools Metrics
(CloudWatch EMF), so this module stays free of AWS clients and is tested without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kiln.rules import stopping_limits
from kiln.store import ACTIVE, JobStore, ListQuery

NAMESPACE = "Kiln"
SERVICE = "kiln"  # the one dimension of every job metric (Powertools' "service")
JOBS_COMPLETED = "JobsCompleted"
JOBS_FAILED = "JobsFailed"
JOBS_FAILED_SERVER_ERROR = "JobsFailedServerError"  # the failures that are Kiln's fault
JOBS_STOPPED = "JobsStopped"
JOB_DURATION = "JobDurationSeconds"  # CreationTime to CompilationEndTime of a terminal job
CONTAINER_FAILURES = "CompilerContainerFailures"  # compiler containers that exited non-zero
ACTIVE_JOBS = {"STARTING": "JobsStarting", "INPROGRESS": "JobsInProgress", "STOPPING": "JobsStopping"}
OVERDUE_JOBS = "JobsPastTheirLimits"
# The workflow may take this long beyond MaxPendingTimeInSeconds + MaxRuntimeInSeconds (its Lambda
# steps and their retries) before an active job counts as overdue.
OVERDUE_GRACE_SECONDS = 600

Metric = tuple[str, str, float]  # (name, unit: "Count" | "Seconds", value)


def outcome_metrics(record: dict[str, Any] | None) -> list[Metric]:
    """The metrics of a job a record step just moved to a terminal state (none if it did not)."""
    if not record:
        return []
    status = record.get("CompilationJobStatus")
    metrics: list[Metric] = []
    if status == "COMPLETED":
        metrics.append((JOBS_COMPLETED, "Count", 1))
    elif status == "FAILED":
        metrics.append((JOBS_FAILED, "Count", 1))
        if str(record.get("FailureReason", "")).startswith("ServerError"):
            metrics.append((JOBS_FAILED_SERVER_ERROR, "Count", 1))
    elif status == "STOPPED":
        metrics.append((JOBS_STOPPED, "Count", 1))
    else:
        return []
    end, created = record.get("CompilationEndTime"), record.get("CreationTime")
    if isinstance(end, int | float) and isinstance(created, int | float) and end >= created:
        metrics.append((JOB_DURATION, "Seconds", round(float(end) - float(created), 3)))
    return metrics


@dataclass
class Census:
    """Active jobs by status, and the names of those running past pending + runtime limits."""

    by_status: dict[str, int] = field(default_factory=dict)
    overdue: list[str] = field(default_factory=list)

    def metrics(self) -> list[Metric]:
        found: list[Metric] = [(ACTIVE_JOBS[s], "Count", self.by_status.get(s, 0)) for s in ACTIVE_JOBS]
        return [*found, (OVERDUE_JOBS, "Count", len(self.overdue))]


def is_overdue(record: dict[str, Any], now: float, grace: float = OVERDUE_GRACE_SECONDS) -> bool:
    """An active job older than its MaxPendingTimeInSeconds + MaxRuntimeInSeconds + ``grace``."""
    runtime, pending = stopping_limits(record.get("StoppingCondition"))
    return bool(now - float(record["CreationTime"]) > pending + runtime + grace)


def take_census(store: JobStore, now: float | None = None) -> Census:
    """Count the active jobs by status through the status index (queries, never a Scan)."""
    now = time.time() if now is None else now
    census = Census()
    for status in ACTIVE:
        count, token = 0, None
        while True:
            items, token = store.list(ListQuery(status_equals=status, sort_by="Status", max_results=100), token)
            count += len(items)
            census.overdue += [i["CompilationJobName"] for i in items if is_overdue(i, now)]
            if not token:
                break
        census.by_status[status] = count
    return census


def container_failed(exit_code: int | None, stop_code: str = "") -> bool:
    """A compiler container that ended abnormally: a non-zero exit, or no exit code at all (it failed
    to start), unless Kiln itself stopped it (ECS stopCode ``UserInitiated``)."""
    if stop_code == "UserInitiated":
        return False
    return exit_code != 0


def emit(metrics: list[Metric]) -> None:
    """Write ``metrics`` as one CloudWatch EMF record on stdout, dimension ``service`` = :data:`SERVICE`
    (Powertools; a no-op when ``POWERTOOLS_METRICS_DISABLED`` is set, as local mode does)."""
    if not metrics:
        return
    from aws_lambda_powertools.metrics import MetricUnit
    from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider

    # Its own provider: Powertools' ``Metrics`` instances share one metric set per process, and a flush
    # here must neither take nor drop what a handler's ``log_metrics`` collects (the API's Requests).
    recorder = AmazonCloudWatchEMFProvider(namespace=NAMESPACE, service=SERVICE,
                                           default_dimensions={"service": SERVICE})
    for name, unit, value in metrics:
        recorder.add_metric(name=name, unit=MetricUnit(unit), value=value)
    recorder.flush_metrics()
