"""KilnMonitoring: the operators' CloudWatch dashboard and alarms, and the schedule of the job census.

Job metrics are Kiln's own (namespace ``Kiln``, dimension ``service=kiln``; kiln.job_metrics): the
outcome of every terminal status change (emitted where the change is published, kiln.events), and
every 5 minutes a census of active jobs by status and of those past MaxPendingTimeInSeconds +
MaxRuntimeInSeconds (the workflow function's ``Census`` step, run by an EventBridge schedule).
The rest are the services' own metrics (API Gateway, Lambda, Step Functions, SQS).

Alarms go to the SNS topic ``KilnConfig.alarm_topic_arn`` (state changes to ALARM and back to OK);
without one they are still created and shown on the dashboard, with no action.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from kiln_infra.config import KilnConfig

# The names kiln.job_metrics emits (infra never imports runtime code: docs/adr/0001).
NAMESPACE = "Kiln"
DIMENSIONS = {"service": "kiln"}
OUTCOMES = ("JobsCompleted", "JobsFailed", "JobsFailedServerError", "JobsStopped")
ACTIVE = ("JobsStarting", "JobsInProgress", "JobsStopping")
OVERDUE = "JobsPastTheirLimits"
DURATION = "JobDurationSeconds"
CONTAINER_FAILURES = "CompilerContainerFailures"
CENSUS_EVENT = {"Step": "Census"}
CENSUS_RATE = Duration.minutes(5)
PERIOD = Duration.minutes(5)


def kiln_metric(name: str, *, statistic: str = "Sum", period: Duration = PERIOD, label: str | None = None) -> cw.Metric:
    """One of Kiln's job metrics."""
    return cw.Metric(namespace=NAMESPACE, metric_name=name, dimensions_map=DIMENSIONS, statistic=statistic,
                     period=period, label=label or name)


class KilnMonitoring(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: KilnConfig, api: apigw.RestApi,
                 functions: Mapping[str, lambda_.IFunction], state_machine: sfn.StateMachine,
                 dead_letters: sqs.IQueue, census: lambda_.IFunction) -> None:
        super().__init__(scope, construct_id)
        self.census_rule = events.Rule(
            self, "JobCensus", schedule=events.Schedule.rate(CENSUS_RATE),
            description="Kiln: counts active jobs and those past their limits (dashboard, overdue alarm)",
            targets=[targets.LambdaFunction(census, event=events.RuleTargetInput.from_object(CENSUS_EVENT),
                                            dead_letter_queue=dead_letters, retry_attempts=2,
                                            max_event_age=CENSUS_RATE)])
        self.alarms = self._alarms(config, api, state_machine, dead_letters)
        if config.alarm_topic_arn:
            topic = sns.Topic.from_topic_arn(self, "AlarmTopic", config.alarm_topic_arn)
            for alarm in self.alarms.values():
                alarm.add_alarm_action(cw_actions.SnsAction(topic))
                alarm.add_ok_action(cw_actions.SnsAction(topic))
        self.dashboard = self._dashboard(api, functions, state_machine)

    def _alarms(self, config: KilnConfig, api: apigw.RestApi, state_machine: sfn.StateMachine,
                dead_letters: sqs.IQueue) -> dict[str, cw.Alarm]:
        period = Duration.minutes(15)
        failed, completed = (kiln_metric(n, period=period) for n in ("JobsFailed", "JobsCompleted"))
        failed_rate = cw.MathExpression(
            # At least 3 finished jobs in the window, so one failed job alone does not page anyone.
            expression="IF(failed + completed >= 3, failed / (failed + completed), 0)",
            using_metrics={"failed": failed, "completed": completed}, period=period, label="failed-job rate")
        missing = cw.TreatMissingData.NOT_BREACHING
        at_least = cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
        return {
            "FailedJobRate": cw.Alarm(
                self, "FailedJobRate", metric=failed_rate, threshold=config.alarm_failed_job_rate,
                evaluation_periods=1, comparison_operator=at_least, treat_missing_data=missing,
                alarm_description=f"Kiln: {config.alarm_failed_job_rate:.0%} or more of the jobs finished in 15 "
                                  "minutes FAILED (see the dashboard's ServerError share)"),
            "JobsPastTheirLimits": cw.Alarm(
                self, "JobsPastTheirLimits", metric=kiln_metric(OVERDUE, statistic="Maximum"), threshold=1,
                evaluation_periods=2, comparison_operator=at_least, treat_missing_data=missing,
                alarm_description="Kiln: jobs still active past MaxPendingTimeInSeconds + MaxRuntimeInSeconds "
                                  "(their workflow is stuck or lost); the workflow logs name them"),
            "ExecutionsTimedOut": cw.Alarm(
                self, "ExecutionsTimedOut", metric=state_machine.metric_timed_out(period=PERIOD, statistic="Sum"),
                threshold=1, evaluation_periods=1, comparison_operator=at_least, treat_missing_data=missing,
                alarm_description="Kiln: a compilation workflow ran past the state machine's own timeout"),
            "ApiServerErrors": cw.Alarm(
                self, "ApiServerErrors", metric=api.metric_server_error(period=PERIOD, statistic="Sum"),
                threshold=config.alarm_api_server_errors, evaluation_periods=1, comparison_operator=at_least,
                treat_missing_data=missing, alarm_description="Kiln: the API answered with 5xx errors"),
            "UndeliveredEvents": cw.Alarm(
                self, "UndeliveredEvents", metric=dead_letters.metric_approximate_number_of_messages_visible(
                    period=PERIOD, statistic="Maximum"),
                threshold=1, evaluation_periods=1, comparison_operator=at_least, treat_missing_data=missing,
                alarm_description="Kiln: events EventBridge could not deliver to Kiln's functions (task-stopped "
                                  "events, registry events, the census) are waiting in the dead-letter queue"),
        }

    def _dashboard(self, api: apigw.RestApi, functions: Mapping[str, lambda_.IFunction],
                   state_machine: sfn.StateMachine) -> cw.Dashboard:
        dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=f"{Stack.of(self).stack_name}-jobs",
                                 default_interval=Duration.hours(6))
        width = 8
        dashboard.add_widgets(
            cw.GraphWidget(title="Jobs finished, by status", width=width, stacked=True,
                           left=[kiln_metric(n) for n in OUTCOMES]),
            cw.GraphWidget(title="Active jobs, by status (census every 5 minutes)", width=width,
                           left=[kiln_metric(n, statistic="Maximum") for n in (*ACTIVE, OVERDUE)]),
            cw.GraphWidget(title="Job duration, creation to end (s)", width=width,
                           left=[kiln_metric(DURATION, statistic=s, label=f"duration {s}")
                                 for s in ("p50", "p90", "Maximum")]),
        )
        dashboard.add_widgets(
            cw.GraphWidget(title="API requests with 4xx / 5xx answers", width=width, left=[
                api.metric_client_error(period=PERIOD, statistic="Sum", label="4xx"),
                api.metric_server_error(period=PERIOD, statistic="Sum", label="5xx")]),
            cw.GraphWidget(title="API latency (ms)", width=width, left=[
                api.metric_latency(period=PERIOD, statistic=s, label=f"latency {s}") for s in ("p50", "p99")]),
            cw.GraphWidget(title="Compilation workflows failed / timed out / aborted", width=width, left=[
                state_machine.metric_failed(period=PERIOD, statistic="Sum", label="failed"),
                state_machine.metric_timed_out(period=PERIOD, statistic="Sum", label="timed out"),
                state_machine.metric_aborted(period=PERIOD, statistic="Sum", label="aborted")]),
        )
        dashboard.add_widgets(
            cw.GraphWidget(title="Lambda errors", width=width, left=[
                f.metric_errors(period=PERIOD, statistic="Sum", label=name) for name, f in functions.items()]),
            cw.GraphWidget(title="Lambda throttles", width=width, left=[
                f.metric_throttles(period=PERIOD, statistic="Sum", label=name) for name, f in functions.items()]),
            cw.GraphWidget(title="Compiler containers (Fargate tasks, Batch jobs) that failed", width=width,
                           left=[kiln_metric(CONTAINER_FAILURES, label="failed containers")]),
        )
        dashboard.add_widgets(cw.AlarmStatusWidget(title="Kiln alarms", width=24, alarms=list(self.alarms.values())))
        return dashboard
