"""KilnEvents: the EventBridge rules that feed Kiln's functions, and Kiln's own event bus if configured.

AWS services publish to the default bus, so the rules live there; Kiln publishes its
``Compilation Job State Change`` events to ``event_bus_name`` ("default", or a bus created here).
"""

from __future__ import annotations

from aws_cdk import Aws, Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from kiln_infra.key import KilnKey
from kiln_infra.runners import CompilerRunners


class KilnEvents(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, bus_name: str, runners: CompilerRunners,
                 container_stopped: lambda_.IFunction, registry: lambda_.IFunction, key: KilnKey) -> None:
        super().__init__(scope, construct_id)
        self.bus: events.EventBus | None = None
        if bus_name != "default":
            self.bus = events.EventBus(self, "Bus", event_bus_name=bus_name)
        # Events that could not be delivered after retries land here (encrypted, TLS only).
        self.dead_letters = sqs.Queue(self, "UndeliveredEvents", encryption=sqs.QueueEncryption.KMS,
                                      encryption_master_key=key.key, enforce_ssl=True,
                                      retention_period=Duration.days(14))
        key.key.add_to_resource_policy(iam.PolicyStatement(
            sid="EventBridgeDeadLettersOfThisAccount", principals=[iam.ServicePrincipal("events.amazonaws.com")],
            actions=["kms:Decrypt", "kms:GenerateDataKey"], resources=["*"],  # in a key policy, "*" is this key
            conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}}))

        def target(function: lambda_.IFunction) -> targets.LambdaFunction:
            return targets.LambdaFunction(function, dead_letter_queue=self.dead_letters, retry_attempts=8,
                                          max_event_age=Duration.hours(2))

        self.ecs_task_stopped = events.Rule(
            self, "CompilerTaskStopped", description="Kiln: a compiler task on Fargate stopped",
            event_pattern=events.EventPattern(
                source=["aws.ecs"], detail_type=["ECS Task State Change"],
                detail={"clusterArn": [runners.cluster.cluster_arn], "lastStatus": ["STOPPED"]}),
            targets=[target(container_stopped)])
        if runners.job_queue is not None:
            self.batch_job_done = events.Rule(
                self, "GpuJobDone", description="Kiln: a compiler job on AWS Batch ended",
                event_pattern=events.EventPattern(
                    source=["aws.batch"], detail_type=["Batch Job State Change"],
                    detail={"jobQueue": [runners.job_queue.job_queue_arn], "status": ["FAILED", "SUCCEEDED"]}),
                targets=[target(container_stopped)])
        self.model_package_changed = events.Rule(
            self, "ModelPackageStateChange", description="Kiln: compile new model packages (registry hook)",
            event_pattern=events.EventPattern(source=["aws.sagemaker"],
                                              detail_type=["SageMaker Model Package State Change"]),
            targets=[target(registry)])

