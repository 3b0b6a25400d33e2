"""The operators' dashboard and alarms (kiln_infra.monitoring) and the job census schedule."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kiln import job_metrics
from kiln_infra import monitoring
from kiln_infra.config import KilnConfig
from pydantic import ValidationError

from .conftest import ALARM_TOPIC, Synthesized, resolve

ALARMS = {"FailedJobRate", "JobsPastTheirLimits", "ExecutionsTimedOut", "ApiServerErrors", "UndeliveredEvents"}


def _alarms(synth: Synthesized) -> dict[str, dict[str, Any]]:
    """Kiln's alarms by their construct id."""
    found = {}
    for logical_id, alarm in synth.of_type("AWS::CloudWatch::Alarm").items():
        name = next((a for a in ALARMS if logical_id.startswith(f"Monitoring{a}")), None)
        assert name, logical_id
        found[name] = alarm["Properties"]
    return found


def _metric_of(alarm: dict[str, Any]) -> tuple[str, str]:
    """(namespace, metric name) of a single-metric alarm, in either of CloudFormation's forms."""
    if "MetricName" in alarm:
        return alarm["Namespace"], alarm["MetricName"]
    (stat,) = [m["MetricStat"]["Metric"] for m in alarm["Metrics"]]
    return stat["Namespace"], stat["MetricName"]


def _dashboard_metrics(synth: Synthesized) -> list[list[Any]]:
    """Every metric line of the dashboard ([namespace, name, dimension, value, ..., options])."""
    _, dashboard = synth.one("AWS::CloudWatch::Dashboard")
    body = json.loads(resolve(dashboard["Properties"]["DashboardBody"]))
    return [line for widget in body["widgets"] for line in widget["properties"].get("metrics", [])]


def test_metric_names_match_what_the_functions_emit() -> None:
    # GIVEN the names the dashboard reads (infra does not import runtime code) and those kiln.job_metrics emits
    # THEN they are the same
    assert monitoring.NAMESPACE == job_metrics.NAMESPACE and monitoring.DIMENSIONS == {"service": job_metrics.SERVICE}
    assert set(monitoring.OUTCOMES) == {job_metrics.JOBS_COMPLETED, job_metrics.JOBS_FAILED,
                                        job_metrics.JOBS_FAILED_SERVER_ERROR, job_metrics.JOBS_STOPPED}
    assert set(monitoring.ACTIVE) == set(job_metrics.ACTIVE_JOBS.values())
    assert (monitoring.OVERDUE, monitoring.DURATION, monitoring.CONTAINER_FAILURES) == (
        job_metrics.OVERDUE_JOBS, job_metrics.JOB_DURATION, job_metrics.CONTAINER_FAILURES)


def test_dashboard_shows_jobs_api_lambdas_workflows_and_containers(synth: Synthesized) -> None:
    # GIVEN the default deployment's dashboard
    lines = _dashboard_metrics(synth)
    shown = {(line[0], line[1]) for line in lines}
    # THEN it graphs jobs by status (finished and active), their duration, the API's 4xx/5xx and latency,
    # every function's errors and throttles, failed/timed-out workflows and failed compiler containers
    kiln = {("Kiln", n) for n in (*monitoring.OUTCOMES, *monitoring.ACTIVE, monitoring.OVERDUE, monitoring.DURATION,
                                  monitoring.CONTAINER_FAILURES)}
    assert kiln <= shown
    assert {("AWS/ApiGateway", "4XXError"), ("AWS/ApiGateway", "5XXError"), ("AWS/ApiGateway", "Latency"),
            ("AWS/States", "ExecutionsFailed"), ("AWS/States", "ExecutionsTimedOut")} <= shown
    functions = {line[3] for line in lines if line[:2] in (["AWS/Lambda", "Errors"], ["AWS/Lambda", "Throttles"])}
    assert len(functions) == len(synth.of_type("AWS::Lambda::Function")) == 4
    # AND Kiln's metrics carry the dimension the functions emit
    assert all(line[2:4] == ["service", "kiln"] for line in lines if line[0] == "Kiln")


def test_alarms_without_a_topic_have_no_action(synth: Synthesized) -> None:
    # GIVEN the default deployment (no alarm_topic_arn)
    alarms = _alarms(synth)
    # THEN every alarm exists, with no action
    assert set(alarms) == ALARMS
    assert all(not a.get("AlarmActions") and not a.get("OKActions") for a in alarms.values())


def test_alarms_notify_the_configured_topic(synth_cpu_only_imported_vpc: Synthesized) -> None:
    # GIVEN a deployment with alarm_topic_arn and a failed-job rate of 0.2
    alarms = _alarms(synth_cpu_only_imported_vpc)
    # THEN every alarm notifies the topic on ALARM and on OK
    assert set(alarms) == ALARMS
    assert all(a["AlarmActions"] == [ALARM_TOPIC] and a["OKActions"] == [ALARM_TOPIC] for a in alarms.values())
    # AND the failed-job rate alarm is the configured share of failed / finished jobs (3 at least)
    rate = alarms["FailedJobRate"]
    assert rate["Threshold"] == 0.2 and rate["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    expression = next(m["Expression"] for m in rate["Metrics"] if "Expression" in m)
    assert expression == "IF(failed + completed >= 3, failed / (failed + completed), 0)"
    stats = {m["Id"]: m["MetricStat"]["Metric"]["MetricName"] for m in rate["Metrics"] if "MetricStat" in m}
    assert stats == {"failed": "JobsFailed", "completed": "JobsCompleted"}


def test_alarms_watch_overdue_jobs_api_5xx_and_the_dead_letter_queue(synth: Synthesized) -> None:
    # GIVEN the default deployment's alarms
    alarms = _alarms(synth)
    # THEN jobs past their limits, timed-out executions, API 5xx and undelivered events each alarm from one
    assert _metric_of(alarms["JobsPastTheirLimits"]) == ("Kiln", "JobsPastTheirLimits")
    assert _metric_of(alarms["ExecutionsTimedOut"]) == ("AWS/States", "ExecutionsTimedOut")
    assert _metric_of(alarms["ApiServerErrors"]) == ("AWS/ApiGateway", "5XXError")
    dlq = alarms["UndeliveredEvents"]
    assert _metric_of(dlq) == ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
    queue_id = resolve(dlq["Dimensions"][0]["Value"]).split(".")[0].strip("<")
    assert queue_id.startswith("KilnEventsUndeliveredEvents")
    assert all(a["Threshold"] == 1 and a["TreatMissingData"] == "notBreaching" for n, a in alarms.items()
               if n != "FailedJobRate")


def test_census_runs_every_five_minutes_on_the_workflow_function(synth: Synthesized) -> None:
    # GIVEN the scheduled rules
    rules = {k: v["Properties"] for k, v in synth.of_type("AWS::Events::Rule").items()
             if v["Properties"].get("ScheduleExpression")}
    # THEN one runs the workflow function's Census step every 5 minutes, with the events' dead-letter queue
    (rule,) = rules.values()
    assert rule["ScheduleExpression"] == "rate(5 minutes)"
    (target,) = rule["Targets"]
    assert json.loads(target["Input"]) == {"Step": "Census"}
    assert resolve(target["Arn"]).startswith("<WorkflowFunctionsSteps")
    assert resolve(target["DeadLetterConfig"]["Arn"]).startswith("<KilnEventsUndeliveredEvents")


@pytest.mark.parametrize("bad", [
    {"alarm_topic_arn": "kiln-operators"},
    {"alarm_topic_arn": "arn:aws:sqs:us-east-1:123456789012:queue"},
    {"alarm_failed_job_rate": 0},
    {"alarm_failed_job_rate": 1.5},
    {"alarm_api_server_errors": 0},
])
def test_invalid_alarm_settings_are_refused(bad: dict[str, object]) -> None:
    # GIVEN an alarm setting that cannot work WHEN it is read THEN synth stops naming the field
    with pytest.raises(ValidationError, match=next(iter(bad))):
        KilnConfig.model_validate(bad)
