"""Kiln's Lambda functions: ApiFunction, WorkflowFunctions (steps + container-stopped hook), RegistryFunction.

Each function has its own role with only the statements its code needs (no managed policies:
the CloudWatch Logs statement is explicit, X-Ray's is the one CDK adds for active tracing).
All run the code of ``functions/`` with the dependencies layer (kiln_infra.layer), on Python
3.11/x86_64: the interpreter and architecture of the project's one pinned environment
(docs/adr/0006-deployment-architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from kiln_infra.config import KilnConfig
from kiln_infra.key import KilnKey
from kiln_infra.layer import build_layer
from kiln_infra.logs import encrypted_log_group
from kiln_infra.paths import FUNCTIONS_DIR
from kiln_infra.runners import CompilerRunners
from kiln_infra.table import JobTable
from kiln_infra.workflow import WorkflowArns

RUNTIME = lambda_.Runtime.PYTHON_3_11
ARCHITECTURE = lambda_.Architecture.X86_64
# functions/ also holds the local mode (moto, local servers), the web console and the CLI: not shipped to Lambda.
CODE_EXCLUDE = ["kiln/local", "kiln/local/**", "kiln/console", "kiln/console/**", "kiln/cli.py", "kiln/terminal.py",
                "**/__pycache__", "**/*.pyc", "*.egg-info"]

API_HANDLER = "kiln.handlers.api.handler"
WORKFLOW_HANDLER = "kiln.handlers.workflow.handler"
CONTAINER_STOPPED_HANDLER = "kiln.handlers.workflow.container_stopped"
REGISTRY_HANDLER = "kiln.handlers.registry.handler"


class FunctionPackage(Construct):
    """The code asset (functions/) and the dependencies layer every Kiln function uses."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.code = lambda_.Code.from_asset(str(FUNCTIONS_DIR), exclude=CODE_EXCLUDE)
        self.layer = lambda_.LayerVersion(
            self, "Dependencies", code=lambda_.Code.from_asset(str(build_layer())),
            compatible_runtimes=[RUNTIME], compatible_architectures=[ARCHITECTURE],
            description="Kiln functions' dependencies (infra/lambda-requirements.txt)")


@dataclass(frozen=True)
class FunctionCommon:
    """What every Kiln function shares."""

    package: FunctionPackage
    config: KilnConfig
    key: KilnKey
    removal_policy: RemovalPolicy
    workflow: WorkflowArns
    bus_name: str
    environment: Mapping[str, str] = field(default_factory=dict)

    @property
    def bus_arn(self) -> str:
        return Stack.of(self.package).format_arn(service="events", resource="event-bus",
                                                 resource_name=self.bus_name)


class KilnFunction(Construct):
    """One function with its own role, encrypted log group and environment, X-Ray tracing, Powertools settings."""

    def __init__(self, scope: Construct, construct_id: str, *, common: FunctionCommon, handler: str, service: str,
                 description: str, timeout: Duration, memory_mib: int = 1024) -> None:
        super().__init__(scope, construct_id)
        self.log_group = encrypted_log_group(self, "Logs", key=common.key.key,
                                             retention_days=common.config.log_retention_days,
                                             removal_policy=common.removal_policy)
        self.role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                             description=f"Kiln {service}: {description}")
        self.allow("WriteOwnLogs", ["logs:CreateLogStream", "logs:PutLogEvents"], [self.log_group.log_group_arn])
        common.key.grant_data(self.role)  # the encrypted environment (and the table, for roles that use it)
        self.function = lambda_.Function(
            self, "Function", runtime=RUNTIME, architecture=ARCHITECTURE, handler=handler,
            code=common.package.code, layers=[common.package.layer], role=self.role, log_group=self.log_group,
            timeout=timeout, memory_size=memory_mib, tracing=lambda_.Tracing.ACTIVE,
            environment_encryption=common.key.key, description=f"Kiln: {description}",
            environment={
                "POWERTOOLS_SERVICE_NAME": service,
                "POWERTOOLS_METRICS_NAMESPACE": "Kiln",
                "POWERTOOLS_LOG_LEVEL": "INFO",
                "POWERTOOLS_TRACER_CAPTURE_RESPONSE": "false",  # responses carry job details
                **common.environment,
            })

    def allow(self, sid: str, actions: list[str], resources: list[str],
              conditions: Mapping[str, object] | None = None) -> None:
        self.role.add_to_principal_policy(iam.PolicyStatement(
            sid=sid, actions=actions, resources=resources, conditions=dict(conditions) if conditions else None))


class ApiFunction(KilnFunction):
    """The HTTP API (both protocols): jobs in the table, executions of the workflow, stopping containers."""

    def __init__(self, scope: Construct, construct_id: str, *, common: FunctionCommon, table: JobTable,
                 runners: CompilerRunners) -> None:
        super().__init__(scope, construct_id, common=common, handler=API_HANDLER, service="kiln-api",
                         description="SageMaker compilation-job API", timeout=Duration.seconds(29))
        stack = Stack.of(self)
        table.grant_jobs(self.role)
        self.allow("StartJobs", ["states:StartExecution"], [common.workflow.state_machine])
        self.allow("StopAndDescribeJobExecutions", ["states:DescribeExecution", "states:StopExecution"],
                   [common.workflow.executions])
        self.allow("EndWaitingTasksOfStoppedJobs", ["states:SendTaskFailure"], [common.workflow.state_machine])
        runners.grant_find_and_stop(self.role)
        self.allow("PublishJobEvents", ["events:PutEvents"], [common.bus_arn])
        # CreateCompilationJob checks that the caller may iam:PassRole the job's RoleArn.
        self.allow("CheckCallersMayPassTheJobRole", ["iam:SimulatePrincipalPolicy"], [
            stack.format_arn(service="iam", region="", resource="user", resource_name="*"),
            stack.format_arn(service="iam", region="", resource="role", resource_name="*"),
        ])


class WorkflowFunctions(Construct):
    """The state machine's steps, and the hook that fails the task token of a container that stopped silently."""

    def __init__(self, scope: Construct, construct_id: str, *, common: FunctionCommon, table: JobTable,
                 runners: CompilerRunners) -> None:
        super().__init__(scope, construct_id)
        self.steps = KilnFunction(self, "Steps", common=common, handler=WORKFLOW_HANDLER, service="kiln-workflow",
                                  description="compilation workflow steps", timeout=Duration.seconds(60))
        table.grant_jobs(self.steps.role)
        self.steps.allow("PublishJobEvents", ["events:PutEvents"], [common.bus_arn])
        self.steps.allow("ResolveModelPackages", ["sagemaker:DescribeModelPackage"], [model_packages(self)])
        self.steps.allow("EndWaitingTasks", ["states:SendTaskFailure"], [common.workflow.state_machine])
        runners.grant_find_and_stop(self.steps.role)

        self.container_stopped = KilnFunction(
            self, "ContainerStopped", common=common, handler=CONTAINER_STOPPED_HANDLER, service="kiln-workflow",
            description="fails the task token of a compiler container that stopped without reporting",
            timeout=Duration.seconds(30), memory_mib=512)
        self.container_stopped.allow("EndWaitingTasks", ["states:SendTaskFailure"], [common.workflow.state_machine])


class RegistryFunction(KilnFunction):
    """SageMaker Model Package State Change → compilation jobs for the configured default targets."""

    def __init__(self, scope: Construct, construct_id: str, *, common: FunctionCommon, table: JobTable) -> None:
        super().__init__(scope, construct_id, common=common, handler=REGISTRY_HANDLER, service="kiln-registry",
                         description="compiles newly registered model packages", timeout=Duration.seconds(60))
        table.grant_jobs(self.role)
        self.allow("StartJobs", ["states:StartExecution"], [common.workflow.state_machine])
        self.allow("PublishJobEvents", ["events:PutEvents"], [common.bus_arn])
        self.allow("ReadModelPackages", ["sagemaker:DescribeModelPackage"], [model_packages(self)])


def model_packages(scope: Construct) -> str:
    return Stack.of(scope).format_arn(service="sagemaker", resource="model-package", resource_name="*")
