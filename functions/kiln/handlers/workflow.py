"""Lambda entrypoints of the workflow: the state machine's steps and the container-stopped hook."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from kiln import job_metrics, wiring
from kiln.errors import error_code, is_retryable
from kiln.workflow import TransientError

logger = Logger(service="kiln-workflow")
wiring.start_in_lambda()


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Run one step: ``{"Step": "MarkInProgress" | "ResolveModelPackage" | "PlanBuild" | "RecordSuccess" |
    "RecordFailure", ...}``,
    or the scheduled ``{"Step": "Census"}`` (active-job gauges for the dashboard and the overdue alarm)."""
    steps = wiring.current().workflow_steps
    step = event.get("Step")
    if step == "Census":
        census = steps.census()
        wiring.current().emit_metrics(census["Metrics"])
        return census
    job = event["Job"]
    logger.append_keys(job=job.get("CompilationJobName"), step=step)
    try:
        if step == "MarkInProgress":
            return steps.mark_in_progress(job)
        if step == "ResolveModelPackage":
            return steps.resolve_model_package(job)
        if step == "PlanBuild":
            return steps.plan_build(job, event.get("Limits") or {})
        if step == "RecordSuccess":
            return steps.record_success(job, event["Result"], event.get("TuningWorkers"))
        if step == "RecordFailure":
            return steps.record_failure(job, event.get("Error") or {}, event.get("Limits") or {})
    except ClientError as exc:
        if is_retryable(exc):
            raise TransientError(error_code(exc)) from exc
        raise
    raise ValueError(f"unknown workflow step {step!r}")


@logger.inject_lambda_context
def container_stopped(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """EventBridge ``ECS Task State Change`` (STOPPED) or ``Batch Job State Change`` (FAILED/SUCCEEDED)."""
    detail = event.get("detail", {})
    if event.get("source") == "aws.batch":
        container = detail.get("container", {})
        env = {e["name"]: e.get("value", "") for e in container.get("environment", [])}
        exit_code = container.get("exitCode")
        reason = detail.get("statusReason", "")
        stop_code = ""
    else:
        env = {}
        for override in detail.get("overrides", {}).get("containerOverrides", []):
            env.update({e["name"]: e.get("value", "") for e in override.get("environment", [])})
        containers = detail.get("containers", [])
        exit_code = containers[0].get("exitCode") if containers else None
        reason = detail.get("stoppedReason", "")
        stop_code = str(detail.get("stopCode", ""))
    if job_metrics.container_failed(exit_code, stop_code):
        wiring.current().emit_metrics([(job_metrics.CONTAINER_FAILURES, "Count", 1)])
    name = None
    if env.get("KILN_JOB"):
        name = json.loads(env["KILN_JOB"]).get("CompilationJobName")
    return wiring.current().workflow_steps.container_stopped(name, env.get("KILN_TASK_TOKEN"), exit_code, reason)
