"""KilnStack: the whole service in one stack, composed from small constructs."""

from __future__ import annotations

from typing import Any

from aws_cdk import Aws, CfnOutput, RemovalPolicy, Stack
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from kiln_infra.api import JobApi
from kiln_infra.config import KilnConfig
from kiln_infra.events import KilnEvents
from kiln_infra.functions import (
    ApiFunction,
    FunctionCommon,
    FunctionPackage,
    RegistryFunction,
    WorkflowFunctions,
)
from kiln_infra.key import KilnKey
from kiln_infra.monitoring import KilnMonitoring
from kiln_infra.network import NetworkForCompilers
from kiln_infra.runners import JOB_ROLE_TAG, CompilerRunners
from kiln_infra.serving import ServingImages
from kiln_infra.table import JobTable
from kiln_infra.tuning import TuningRecords
from kiln_infra.workflow import CompilationWorkflow, WorkflowArns


class KilnStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, config: KilnConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, description="Kiln: self-hosted SageMaker-compatible model compilation",
                         **kwargs)
        self.config = config
        stateful = RemovalPolicy.RETAIN if config.deletion_protection else RemovalPolicy.DESTROY
        self.key = KilnKey(self, "KilnKey", removal_policy=stateful)
        self.table = JobTable(self, "JobTable", key=self.key, deletion_protection=config.deletion_protection)
        self.network = NetworkForCompilers(self, "NetworkForCompilers", config=config, key=self.key,
                                           removal_policy=stateful)
        self.workflow_arns = WorkflowArns.named(self, f"{self.stack_name}-CompilationJob")
        # the shared tuning database (KILN_TUNING_DB of every CPU runner), unless the config turns it off
        self.tuning_records = (TuningRecords(self, "TuningRecords", config=config, key=self.key,
                                             removal_policy=stateful)
                               if config.shared_tuning_database and config.cpu_enabled else None)
        self.runners = CompilerRunners(self, "CompilerRunners", config=config, network=self.network, key=self.key,
                                       state_machine_arn=self.workflow_arns.state_machine, removal_policy=stateful,
                                       tuning_records=self.tuning_records)
        self.serving_images = ServingImages(self, "ServingImages", config=config)
        self.pagination_key = secretsmanager.Secret(
            self, "PaginationKey", description="Kiln: HMAC key that signs ListCompilationJobs NextTokens",
            encryption_key=self.key.key, removal_policy=RemovalPolicy.DESTROY,
            generate_secret_string=secretsmanager.SecretStringGenerator(password_length=64,
                                                                       exclude_punctuation=True))
        common = FunctionCommon(
            package=FunctionPackage(self, "FunctionPackage"), config=config, key=self.key, removal_policy=stateful,
            workflow=self.workflow_arns, bus_name=config.event_bus_name, environment=self._environment())
        self.workflow_functions = WorkflowFunctions(self, "WorkflowFunctions", common=common, table=self.table,
                                                    runners=self.runners)
        self.api_function = ApiFunction(self, "ApiFunction", common=common, table=self.table, runners=self.runners)
        self.registry_function = RegistryFunction(self, "RegistryFunction", common=common, table=self.table)
        self.workflow = CompilationWorkflow(self, "CompilationWorkflow", arns=self.workflow_arns,
                                            steps=self.workflow_functions.steps.function, runners=self.runners,
                                            config=config, key=self.key, removal_policy=stateful)
        self.events = KilnEvents(self, "KilnEvents", bus_name=config.event_bus_name, runners=self.runners,
                                 container_stopped=self.workflow_functions.container_stopped.function,
                                 registry=self.registry_function.function, key=self.key)
        self.api = JobApi(self, "JobApi", function=self.api_function.function, config=config, key=self.key,
                          removal_policy=stateful)
        self.monitoring = KilnMonitoring(
            self, "Monitoring", config=config, api=self.api.api, state_machine=self.workflow.state_machine,
            dead_letters=self.events.dead_letters, census=self.workflow_functions.steps.function,
            functions={"api": self.api_function.function, "workflow steps": self.workflow_functions.steps.function,
                       "container stopped": self.workflow_functions.container_stopped.function,
                       "registry": self.registry_function.function})

        CfnOutput(self, "CompilerRoleArn", value=self.runners.role.role_arn,
                  description=f"Job roles (RoleArn) must trust this role and carry the tag {JOB_ROLE_TAG}=true")
        CfnOutput(self, "StateMachineArn", value=self.workflow.state_machine.state_machine_arn)
        if self.tuning_records is not None:
            CfnOutput(self, "TuningRecordsBucket", value=self.tuning_records.bucket.bucket_name,
                      description="The shared tuning database: records/<runner>/ per compiler runner")
        CfnOutput(self, "JobTableName", value=self.table.table.table_name)

    def _environment(self) -> dict[str, str]:
        """The KILN_* settings of every function (kiln.config.KilnSettings)."""
        config, runners = self.config, self.runners
        return {
            "KILN_TABLE_NAME": self.table.table.table_name,
            "KILN_STATE_MACHINE_ARN": self.workflow_arns.state_machine,
            "KILN_ACCOUNT_ID": Aws.ACCOUNT_ID,
            "KILN_EVENT_BUS_NAME": config.event_bus_name,
            "KILN_MAX_ACTIVE_JOBS": str(config.max_active_jobs),
            # Resolved by CloudFormation at deploy; the function environment is encrypted with KilnKey.
            "KILN_PAGINATION_KEY": self.pagination_key.secret_value.unsafe_unwrap(),
            "KILN_INFERENCE_IMAGE": config.inference_image,
            "KILN_INFERENCE_IMAGES": self.serving_images.environment_value(),
            "KILN_ECS_CLUSTER": runners.cluster.cluster_arn,
            "KILN_COMPILER_TASK_FAMILY": runners.task_family,
            "KILN_GPU_JOB_QUEUE": runners.job_queue.job_queue_arn if runners.job_queue else "",
            "KILN_SUBNETS": ",".join(self.network.subnet_ids),
            "KILN_SECURITY_GROUPS": self.network.security_group.security_group_id,
            "KILN_CHECK_PASS_ROLE": "true",
            # The API refuses targets whose runner this deployment did not create.
            "KILN_ENABLED_RUNNERS": ",".join(str(runner) for runner in config.enabled_runners),
            # Batch runner -> its queue and job definition (the execution's Placement, kiln.service)
            "KILN_RUNNER_PLACEMENTS": self.to_json_string(runners.placements),
            "KILN_REGISTRY_OUTPUT_S3": config.registry_output_s3,
            "KILN_REGISTRY_ROLE_ARN": config.registry_role_arn,
            "KILN_REGISTRY_DEFAULT_TARGETS": config.registry_default_targets,
        }
