"""Every cdk-nag acknowledgement of Kiln, each scoped to one resource (construct path) and one
finding (rule id, plus the exact IAM string for IAM4/IAM5 findings), with a reason.

This is the only place where findings are acknowledged; tests/infrastructure checks that each
path names a real resource and that each acknowledgement matches a finding cdk-nag reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Acknowledgment, Stack, Validations
from constructs import IConstruct


@dataclass(frozen=True)
class Suppression:
    path: str  # construct path below the stack, e.g. "JobApi/Api/Resource"
    finding: str  # rule id, with [Resource::...] / [Policy::...] for per-finding rules
    reason: str


_STAR = "AwsSolutions-IAM5[Resource::*]"
_ARN = "arn:<AWS::Partition>"
_REGION_ACCOUNT = "<AWS::Region>:<AWS::AccountId>"
_CLUSTER_TASKS = f"AwsSolutions-IAM5[Resource::{_ARN}:ecs:{_REGION_ACCOUNT}:task/<CompilerRunnersClusterFF31AE66>/*]"
_BATCH_JOBS = f"AwsSolutions-IAM5[Resource::{_ARN}:batch:{_REGION_ACCOUNT}:job/*]"
_MODEL_PACKAGES = f"AwsSolutions-IAM5[Resource::{_ARN}:sagemaker:{_REGION_ACCOUNT}:model-package/*]"
_EXECUTIONS = f"AwsSolutions-IAM5[Resource::{_ARN}:states:{_REGION_ACCOUNT}:execution:Kiln-CompilationJob:*]"
_ROLES = "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:iam::<AWS::AccountId>:role/*]"
_USERS = "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:iam::<AWS::AccountId>:user/*]"

_XRAY = "X-Ray's PutTraceSegments/PutTelemetryRecords have no resource-level permissions (AWS requires '*')"
_FIND_CONTAINERS = ("ecs:ListTasks (scoped by the ecs:cluster condition to Kiln's cluster) and batch:ListJobs/"
                    "DescribeJobs have no resource-level permissions")
_TASKS = ("task IDs are chosen by ECS at RunTask: every task of Kiln's own cluster, also pinned by the "
          "ecs:cluster condition")
_JOBS = "Batch job IDs are chosen at SubmitJob: TerminateJob on the jobs of this account and region"
_L1 = ("Python 3.11 deliberately: the one pinned environment of the project (apache-tvm wheels, tests, local mode, "
       "compiler image) is 3.11, and the functions must run the interpreter the tests run (docs/adr/0006)")
_COG4 = ("The API is authorised with AWS_IAM (SigV4), like the SageMaker API it implements: callers are IAM "
         "principals, not Cognito users")

SUPPRESSIONS: tuple[Suppression, ...] = (
    # -- Lambda runtime --------------------------------------------------------------------------
    Suppression("ApiFunction/Function/Resource", "AwsSolutions-L1", _L1),
    Suppression("WorkflowFunctions/Steps/Function/Resource", "AwsSolutions-L1", _L1),
    Suppression("WorkflowFunctions/ContainerStopped/Function/Resource", "AwsSolutions-L1", _L1),
    Suppression("RegistryFunction/Function/Resource", "AwsSolutions-L1", _L1),
    # -- API ---------------------------------------------------------------------------------
    *(Suppression(f"JobApi/Api/Default/{path}/Resource", "AwsSolutions-COG4", _COG4) for path in (
        "POST", "compilation-jobs/GET", "compilation-jobs/POST", "compilation-jobs/{name}/GET",
        "compilation-jobs/{name}/DELETE", "compilation-jobs/{name}/stop/POST", "compilation-jobs/{name}/tags/GET",
        "compilation-jobs/{name}/tags/POST", "compilation-jobs/{name}/tags/DELETE")),
    Suppression("JobApi/Api/DeploymentStage.v1/Resource", "AwsSolutions-APIG3",
                "Every method requires SigV4 (AWS_IAM) and the stage is throttled; unauthenticated traffic never "
                "reaches the function. A WAFv2 web ACL can be associated by the operator (docs/deploy.md)"),
    Suppression("JobApi/Api/CloudWatchRole/Resource",
                "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonAPIGatewayPushToCloudWatchLogs]",
                "The account-level role API Gateway needs for execution logs; AWS maintains this policy for exactly "
                "that purpose (turn off with api_gateway_cloudwatch_role=false when the account has one)"),
    # -- functions' roles ----------------------------------------------------------------------
    Suppression("ApiFunction/Role/DefaultPolicy/Resource", _STAR, f"{_XRAY}; {_FIND_CONTAINERS}"),
    Suppression("ApiFunction/Role/DefaultPolicy/Resource", _CLUSTER_TASKS, _TASKS),
    Suppression("ApiFunction/Role/DefaultPolicy/Resource", _BATCH_JOBS, _JOBS),
    Suppression("ApiFunction/Role/DefaultPolicy/Resource", _EXECUTIONS,
                "Executions are named after jobs (created at run time): Describe/StopExecution on the executions "
                "of Kiln's state machine only"),
    Suppression("ApiFunction/Role/DefaultPolicy/Resource", _ROLES,
                "iam:SimulatePrincipalPolicy on the calling principal (any role of the account) to check it may "
                "iam:PassRole the job's RoleArn, as SageMaker requires; the action reads policies, grants nothing"),
    Suppression("ApiFunction/Role/DefaultPolicy/Resource", _USERS,
                "iam:SimulatePrincipalPolicy on the calling principal (any IAM user of the account): the PassRole "
                "check of CreateCompilationJob"),
    Suppression("WorkflowFunctions/Steps/Role/DefaultPolicy/Resource", _STAR, f"{_XRAY}; {_FIND_CONTAINERS}"),
    Suppression("WorkflowFunctions/Steps/Role/DefaultPolicy/Resource", _CLUSTER_TASKS, _TASKS),
    Suppression("WorkflowFunctions/Steps/Role/DefaultPolicy/Resource", _BATCH_JOBS, _JOBS),
    Suppression("WorkflowFunctions/Steps/Role/DefaultPolicy/Resource", _MODEL_PACKAGES,
                "A job's ModelPackageVersionArn may name any model package of the account: DescribeModelPackage "
                "(read-only) on them"),
    Suppression("WorkflowFunctions/ContainerStopped/Role/DefaultPolicy/Resource", _STAR, _XRAY),
    Suppression("RegistryFunction/Role/DefaultPolicy/Resource", _STAR, _XRAY),
    Suppression("RegistryFunction/Role/DefaultPolicy/Resource", _MODEL_PACKAGES,
                "The registry hook reads the model package named by the event (any package of the account)"),
    # -- state machine -----------------------------------------------------------------------
    Suppression("CompilationWorkflow/StateMachine/Role/DefaultPolicy/Resource", _STAR,
                "X-Ray tracing and CloudWatch Logs delivery (logs:*LogDelivery, DescribeLogGroups, "
                "Put/DescribeResourcePolicy) have no resource-level permissions; batch:DescribeJobs neither"),
    Suppression("CompilationWorkflow/StateMachine/Role/DefaultPolicy/Resource", _CLUSTER_TASKS, _TASKS),
    Suppression("CompilationWorkflow/StateMachine/Role/DefaultPolicy/Resource", _BATCH_JOBS, _JOBS),
    # -- compiler runners ----------------------------------------------------------------------
    Suppression("CompilerRunners/CompilerRole/DefaultPolicy/Resource", _ROLES,
                "The compiler assumes the job's RoleArn (any role of the account, chosen by the caller, who must "
                "be allowed to pass it); only roles tagged kiln:job-role=true whose trust policy names this role "
                "can be assumed"),
    Suppression("CompilerRunners/CompilerRole/DefaultPolicy/Resource",
                "AwsSolutions-IAM5[Resource::<TuningRecordsBucketCEE0134A.Arn>/records/*]",
                "The shared tuning database: record files under records/<runner>/ (one prefix per runner, files named "
                "by MetaSchedule); Get/PutObject only, no delete, no other prefix of the bucket"),
    Suppression("CompilerRunners/CpuTask/ExecutionRole/DefaultPolicy/Resource", _STAR,
                "ecr:GetAuthorizationToken has no resource-level permissions (image pull)"),
    Suppression("CompilerRunners/GpuContainer/ExecutionRole/DefaultPolicy/Resource", _STAR,
                "ecr:GetAuthorizationToken has no resource-level permissions (image pull)"),
    Suppression("CompilerRunners/CpuFamilyExecutionRole/DefaultPolicy/Resource", _STAR,
                "ecr:GetAuthorizationToken has no resource-level permissions (image pull)"),
    Suppression("CompilerRunners/CpuTask/Resource", "AwsSolutions-ECS2",
                "Only fixed, non-secret settings (work dir, TMPDIR, cache dir, log level, runner, tuning database "
                "location); per-job values arrive "
                "as RunTask overrides and the container gets no secrets"),
    Suppression("CompilerRunners/CpuInstanceRole/Resource",
                "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonEC2ContainerServiceforEC2Role]",
                "The ECS container-instance policy AWS Batch documents for its EC2 instances (ECS agent "
                "registration, image pull, logs); AWS keeps it in step with the agent"),
    Suppression("CompilerRunners/GpuInstanceRole/Resource",
                "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonEC2ContainerServiceforEC2Role]",
                "The ECS container-instance policy AWS Batch documents for its EC2 instances (ECS agent "
                "registration, image pull, logs); AWS keeps it in step with the agent"),
    # -- secrets and queues ----------------------------------------------------------------------
    Suppression("PaginationKey/Resource", "AwsSolutions-SMG4",
                "HMAC key of ListCompilationJobs NextTokens: rotating it only invalidates open pagination tokens; "
                "rotate by hand (docs/deploy.md) if it leaks"),
    Suppression("KilnEvents/UndeliveredEvents/Resource", "AwsSolutions-SQS3",
                "This queue is itself the dead-letter queue of Kiln's EventBridge targets"),
)


def find(stack: Stack, path: str) -> IConstruct | None:
    node: IConstruct | None = stack
    for part in path.split("/"):
        node = node.node.try_find_child(part) if node is not None else None
    return node


def apply_suppressions(stack: Stack) -> None:
    for suppression in SUPPRESSIONS:
        construct = find(stack, suppression.path)
        if construct is None:  # turned off by KilnConfig (e.g. no GPU runner); the tests check the default
            continue
        Validations.of(construct).acknowledge(Acknowledgment(id=suppression.finding, reason=suppression.reason))
