"""CompilationWorkflow: the state machine of statemachine/compilation_job.asl.json, inlined.

The definition is the very file the local stack runs; CloudFormation fills its ``${...}``
placeholders (DefinitionSubstitutions). Raw ASL gets no automatic grants from CDK, so every
integration it uses is granted here explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import ArnFormat, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from kiln_infra.config import KilnConfig
from kiln_infra.key import KilnKey
from kiln_infra.logs import encrypted_log_group
from kiln_infra.paths import STATE_MACHINE_FILE
from kiln_infra.runners import CONTAINER_NAME, CompilerRunners

# Step Functions creates (once per account and region) these managed rules for .sync ECS/Batch tasks.
MANAGED_RULES = ("StepFunctionsGetEventsForECSTaskRule", "StepFunctionsGetEventsForBatchJobsRule")


@dataclass(frozen=True)
class WorkflowArns:
    """The state machine's ARNs, built from its name: the roles of the functions it invokes refer to
    it without a dependency cycle (state machine → function → role policy → state machine)."""

    name: str
    state_machine: str
    executions: str

    @classmethod
    def named(cls, scope: Construct, name: str) -> WorkflowArns:
        stack = Stack.of(scope)
        return cls(name=name,
                   state_machine=stack.format_arn(service="states", resource="stateMachine", resource_name=name,
                                                  arn_format=ArnFormat.COLON_RESOURCE_NAME),
                   executions=stack.format_arn(service="states", resource="execution", resource_name=f"{name}:*",
                                               arn_format=ArnFormat.COLON_RESOURCE_NAME))


class CompilationWorkflow(Construct):
    """Standard workflow, X-Ray traced, logging ALL events without execution data (jobs carry user data)."""

    def __init__(self, scope: Construct, construct_id: str, *, arns: WorkflowArns, steps: lambda_.IFunction,
                 runners: CompilerRunners, config: KilnConfig, key: KilnKey, removal_policy: RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.log_group = encrypted_log_group(self, "Logs", key=key.key, retention_days=config.log_retention_days,
                                             removal_policy=removal_policy,
                                             name=f"/aws/vendedlogs/states/{arns.name}")
        self.substitutions = self._substitutions(stack, steps, runners)
        self.state_machine = sfn.StateMachine(
            self, "StateMachine", state_machine_name=arns.name, state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=sfn.DefinitionBody.from_string(STATE_MACHINE_FILE.read_text()),
            definition_substitutions=self.substitutions, tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=False))
        self._grant_integrations(stack, steps, runners)

    @staticmethod
    def _substitutions(stack: Stack, steps: lambda_.IFunction, runners: CompilerRunners) -> dict[str, str]:
        def disabled(service: str, resource: str) -> str:  # a family turned off in KilnConfig: jobs for it fail
            return stack.format_arn(service=service, resource=resource, resource_name="kiln-disabled")

        return {
            "WorkflowFunctionArn": steps.function_arn,
            "ClusterArn": runners.cluster.cluster_arn,
            "CpuTaskDefinitionArn": (runners.task_definition.task_definition_arn if runners.task_definition
                                     else disabled("ecs", "task-definition")),
            "CompilerContainerName": CONTAINER_NAME,
        }

    def _allow(self, sid: str, actions: list[str], resources: list[str],
               conditions: dict[str, object] | None = None) -> None:
        self.state_machine.add_to_role_policy(iam.PolicyStatement(sid=sid, actions=actions, resources=resources,
                                                                  conditions=conditions))

    def _grant_integrations(self, stack: Stack, steps: lambda_.IFunction, runners: CompilerRunners) -> None:
        self._allow("InvokeWorkflowSteps", ["lambda:InvokeFunction"], [steps.function_arn])
        rules = [stack.format_arn(service="events", resource="rule", resource_name=rule) for rule in MANAGED_RULES]
        self._allow("ManagedRulesForContainerTasks", ["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                    rules)
        if runners.task_definition is not None:
            self._allow("RunCompilerTasks", ["ecs:RunTask"], [runners.task_definition.task_definition_arn],
                        {"ArnEquals": {"ecs:cluster": runners.cluster.cluster_arn}})
            self._allow("StopAndDescribeCompilerTasks", ["ecs:StopTask", "ecs:DescribeTasks"],
                        [runners.task_arn_pattern()], {"ArnEquals": {"ecs:cluster": runners.cluster.cluster_arn}})
            self._allow("PassCompilerTaskRoles", ["iam:PassRole"], runners.task_role_arns,
                        {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}})
        if runners.batch_runners:
            # the execution's Placement names one of these queues and job definitions (kiln.service)
            self._allow("SubmitBatchJobs", ["batch:SubmitJob"],
                        [arn for queue, definition in runners.batch_runners.values()
                         for arn in (queue.job_queue_arn, definition.job_definition_arn)])
            self._allow("StopBatchJobs", ["batch:TerminateJob"],
                        [stack.format_arn(service="batch", resource="job", resource_name="*")])
            self._allow("DescribeBatchJobs", ["batch:DescribeJobs"], ["*"])
