"""CompilerRunners: where the compiler container runs.

CPU targets run as ECS Fargate tasks; NVIDIA targets as AWS Batch jobs on GPU EC2 instances.
Both run the image built from compiler-container/ with ``python -m kiln_compiler`` as a
non-root user on a read-only root filesystem, writing only to the scratch and /tmp volumes.

The one compiler role is what both runners' containers get: it may report to the workflow
(task-token callbacks), assume job roles that trust it and carry the ``kiln:job-role`` tag, and
read and write the shared tuning records (kiln_infra.tuning); it has no access to users' data itself
(that comes with the assumed job role, as in SageMaker).
"""

from __future__ import annotations

from aws_cdk import Aws, IgnoreMode, RemovalPolicy, Size, Stack
from aws_cdk import aws_batch as batch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from constructs import Construct
from kiln.catalog import Runner

from kiln_infra.config import KilnConfig
from kiln_infra.key import KilnKey
from kiln_infra.logs import encrypted_log_group
from kiln_infra.network import NetworkForCompilers
from kiln_infra.paths import COMPILER_CONTEXT_EXCLUDE, COMPILER_DOCKERFILE, COMPILER_GPU_DOCKERFILE, REPO_ROOT
from kiln_infra.tuning import TuningRecords

CONTAINER_NAME = "compiler"
ENTRY_POINT = ["python", "-m", "kiln_compiler"]
SCRATCH = "/scratch"
JOB_ROLE_TAG = "kiln:job-role"
# The container's environment that is not per job (per-job values come as overrides).
STATIC_ENVIRONMENT = {"KILN_WORK_DIR": SCRATCH, "TMPDIR": "/tmp", "XDG_CACHE_HOME": "/tmp/cache",
                      "KILN_LOG_LEVEL": "INFO"}
TASK_RESPONSE_ACTIONS = ["states:SendTaskHeartbeat", "states:SendTaskSuccess", "states:SendTaskFailure"]


def compiler_image(scope: Construct, construct_id: str, config: KilnConfig, *, gpu: bool,
                   arm64: bool = False) -> ecs.ContainerImage:
    """The compiler image: built from compiler-container/ at deploy, or a prebuilt tag in ECR.

    The arm64 image (Graviton runners) is the same Dockerfile built for linux/arm64."""
    tag = config.gpu_image_tag if gpu else config.arm64_image_tag if arm64 else config.cpu_image_tag
    if tag == "asset":
        return ecs.ContainerImage.from_asset(
            str(REPO_ROOT), file=COMPILER_GPU_DOCKERFILE if gpu else COMPILER_DOCKERFILE,
            exclude=COMPILER_CONTEXT_EXCLUDE, ignore_mode=IgnoreMode.DOCKER,
            platform=ecr_assets.Platform.LINUX_ARM64 if arm64 else ecr_assets.Platform.LINUX_AMD64)
    assert config.compiler_repository is not None  # KilnConfig guarantees it
    repository = ecr.Repository.from_repository_name(scope, construct_id, config.compiler_repository)
    return ecs.ContainerImage.from_ecr_repository(repository, tag)


class CompilerRunners(Construct):
    """ECS cluster + Fargate task definition (CPU) and Batch compute environment, queue and job definition (GPU)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: KilnConfig, network: NetworkForCompilers,
                 key: KilnKey, state_machine_arn: str, removal_policy: RemovalPolicy,
                 tuning_records: TuningRecords | None = None) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.task_family = f"{stack.stack_name}-compiler"
        self.log_group = encrypted_log_group(self, "Logs", key=key.key, retention_days=config.log_retention_days,
                                             removal_policy=removal_policy)
        self.role = self._compiler_role(state_machine_arn)
        self.tuning_records = tuning_records
        if tuning_records is not None:
            tuning_records.grant_records(self.role)

        self.cluster = ecs.Cluster(self, "Cluster", vpc=network.vpc,
                                   container_insights_v2=ecs.ContainerInsights.ENABLED)
        self.task_definition: ecs.FargateTaskDefinition | None = None
        if config.cpu_enabled:
            self.task_definition = self._fargate(config)
        self.job_queue: batch.JobQueue | None = None
        self.job_definition: batch.EcsJobDefinition | None = None
        # every Batch runner: kiln.catalog.Runner value -> (queue, job definition)
        self.batch_runners: dict[str, tuple[batch.JobQueue, batch.EcsJobDefinition]] = {}
        if config.gpu_enabled:
            self._batch(config, network)
            assert self.job_queue is not None and self.job_definition is not None
            self.batch_runners[str(Runner.BATCH_GPU)] = (self.job_queue, self.job_definition)
        if config.batch_cpu_runners:
            self._batch_families(config, network)

    # -- the compiler's role ------------------------------------------------------------------------
    def _compiler_role(self, state_machine_arn: str) -> iam.Role:
        stack = Stack.of(self)
        role = iam.Role(
            self, "CompilerRole",
            description="Kiln compiler containers: report to the workflow, assume the job's RoleArn",
            assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com", conditions={
                "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                "ArnLike": {"aws:SourceArn": stack.format_arn(service="ecs", resource="*")},
            }))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReportToTheWorkflow", actions=TASK_RESPONSE_ACTIONS, resources=[state_machine_arn]))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="AssumeTaggedJobRolesThatTrustKiln", actions=["sts:AssumeRole"],
            resources=[stack.format_arn(service="iam", region="", resource="role", resource_name="*")],
            conditions={"StringEquals": {f"aws:ResourceTag/{JOB_ROLE_TAG}": "true"}}))
        return role

    def _environment(self, runner: Runner) -> dict[str, str]:
        """The static environment of ``runner``'s compiler containers (per-job values come as overrides)."""
        environment = {**STATIC_ENVIRONMENT, "KILN_RUNNER": str(runner)}
        if self.tuning_records is not None and not runner.spec.gpu:  # CUDA builds are not tuned (kiln.rules)
            environment["KILN_TUNING_DB"] = self.tuning_records.location(runner)
        return environment

    # -- CPU: ECS Fargate -------------------------------------------------------------------------
    def _fargate(self, config: KilnConfig) -> ecs.FargateTaskDefinition:
        task = ecs.FargateTaskDefinition(
            self, "CpuTask", family=self.task_family, cpu=config.cpu_task_cpu,
            memory_limit_mib=config.cpu_task_memory_mib, ephemeral_storage_gib=config.cpu_task_ephemeral_storage_gib,
            task_role=self.role,
            runtime_platform=ecs.RuntimePlatform(operating_system_family=ecs.OperatingSystemFamily.LINUX,
                                                 cpu_architecture=ecs.CpuArchitecture.X86_64),
            volumes=[ecs.Volume(name="scratch"), ecs.Volume(name="tmp")])
        container = task.add_container(
            CONTAINER_NAME, container_name=CONTAINER_NAME, image=compiler_image(self, "CpuRepository", config, gpu=False),
            entry_point=ENTRY_POINT, command=[], essential=True, readonly_root_filesystem=True,
            user=config.compiler_user, environment=self._environment(Runner.FARGATE),
            logging=ecs.LogDrivers.aws_logs(stream_prefix="cpu", log_group=self.log_group))
        container.add_mount_points(ecs.MountPoint(source_volume="scratch", container_path=SCRATCH, read_only=False),
                                   ecs.MountPoint(source_volume="tmp", container_path="/tmp", read_only=False))
        return task

    # -- GPU: AWS Batch on EC2 ----------------------------------------------------------------------
    def _batch(self, config: KilnConfig, network: NetworkForCompilers) -> None:
        instance_role = iam.Role(
            self, "GpuInstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="ECS container instances of Kiln's Batch GPU compute environment",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(
                "service-role/AmazonEC2ContainerServiceforEC2Role")])
        launch_template = ec2.LaunchTemplate(
            self, "GpuLaunchTemplate", require_imdsv2=True, http_put_response_hop_limit=1,
            block_devices=[ec2.BlockDevice(device_name="/dev/xvda", volume=ec2.BlockDeviceVolume.ebs(
                200, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3, delete_on_termination=True))])
        environment = batch.ManagedEc2EcsComputeEnvironment(
            self, "GpuComputeEnvironment", vpc=network.vpc, vpc_subnets=network.subnets,
            security_groups=[network.security_group], minv_cpus=0, maxv_cpus=config.gpu_max_vcpus,
            instance_types=[ec2.InstanceType(t) for t in config.gpu_instance_types],
            use_optimal_instance_classes=False,
            allocation_strategy=batch.AllocationStrategy.BEST_FIT_PROGRESSIVE,
            images=[batch.EcsMachineImage(image_type=batch.EcsMachineImageType.ECS_AL2023_NVIDIA)],
            instance_role=instance_role, launch_template=launch_template, update_to_latest_image_version=True,
            replace_compute_environment=False)
        self.job_queue = batch.JobQueue(self, "GpuJobQueue", priority=1, compute_environments=[
            batch.OrderedComputeEnvironment(compute_environment=environment, order=1)])
        container = batch.EcsEc2ContainerDefinition(
            self, "GpuContainer", image=compiler_image(self, "GpuRepository", config, gpu=True),
            cpu=config.gpu_job_vcpus, memory=Size.mebibytes(config.gpu_job_memory_mib), gpu=1,
            command=[*ENTRY_POINT], job_role=self.role, readonly_root_filesystem=True, user=config.compiler_user,
            environment=self._environment(Runner.BATCH_GPU),
            logging=ecs.LogDrivers.aws_logs(stream_prefix="gpu", log_group=self.log_group),
            volumes=[batch.EcsVolume.host(name="scratch", container_path=SCRATCH, readonly=False),
                     batch.EcsVolume.host(name="tmp", container_path="/tmp", readonly=False)])
        self.job_definition = batch.EcsJobDefinition(self, "GpuJobDefinition", container=container,
                                                     retry_attempts=1, propagate_tags=True)

    # -- CPU instance families: AWS Batch on EC2, one compute environment per family ---------------
    def _batch_families(self, config: KilnConfig, network: NetworkForCompilers) -> None:
        """A compute environment (0 vCPUs when idle), queue and job definition per enabled family of the
        catalog: a job for ml_c5 is tuned and measured on a c5 instance, one for ml_c6g on a c6g (arm64 image)."""
        instance_role = iam.Role(
            self, "CpuInstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="ECS container instances of Kiln's Batch CPU compute environments",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(
                "service-role/AmazonEC2ContainerServiceforEC2Role")])
        launch_template = ec2.LaunchTemplate(
            self, "CpuLaunchTemplate", require_imdsv2=True, http_put_response_hop_limit=1,
            block_devices=[ec2.BlockDevice(device_name="/dev/xvda", volume=ec2.BlockDeviceVolume.ebs(
                100, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3, delete_on_termination=True))])
        # one execution role (image pull, logs) for every family's containers
        execution_role = iam.Role(self, "CpuFamilyExecutionRole",
                                  assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
                                  description="Pulls the compiler images and writes logs for Kiln's Batch CPU jobs")
        images: dict[str, ecs.ContainerImage] = {}
        for runner in config.batch_cpu_runners:
            spec = runner.spec
            family = str(spec.instance_family)
            arm64 = spec.architecture == "arm64"
            if spec.architecture not in images:
                images[spec.architecture] = compiler_image(self, f"{spec.architecture}Repository", config,
                                                           gpu=False, arm64=arm64)
            label = family.upper()
            environment = batch.ManagedEc2EcsComputeEnvironment(
                self, f"{label}ComputeEnvironment", vpc=network.vpc, vpc_subnets=network.subnets,
                security_groups=[network.security_group], minv_cpus=0, maxv_cpus=config.cpu_family_max_vcpus,
                instance_classes=[getattr(ec2.InstanceClass, family.upper())], use_optimal_instance_classes=False,
                allocation_strategy=batch.AllocationStrategy.BEST_FIT_PROGRESSIVE,
                images=[batch.EcsMachineImage(image_type=batch.EcsMachineImageType.ECS_AL2023)],
                instance_role=instance_role, launch_template=launch_template, update_to_latest_image_version=True,
                replace_compute_environment=False)
            queue = batch.JobQueue(self, f"{label}JobQueue", priority=1, compute_environments=[
                batch.OrderedComputeEnvironment(compute_environment=environment, order=1)])
            container = batch.EcsEc2ContainerDefinition(
                self, f"{label}Container", image=images[spec.architecture], cpu=config.cpu_family_job_vcpus,
                memory=Size.mebibytes(config.cpu_family_job_memory_mib), command=[*ENTRY_POINT], job_role=self.role,
                execution_role=execution_role,
                readonly_root_filesystem=True, user=config.compiler_user,
                # the instance's vCPUs are the job's: TVM's threads follow them (the image's default is 2)
                environment={**self._environment(runner), "TVM_NUM_THREADS": str(config.cpu_family_job_vcpus)},
                logging=ecs.LogDrivers.aws_logs(stream_prefix=family, log_group=self.log_group),
                volumes=[batch.EcsVolume.host(name="scratch", container_path=SCRATCH, readonly=False),
                         batch.EcsVolume.host(name="tmp", container_path="/tmp", readonly=False)])
            definition = batch.EcsJobDefinition(self, f"{label}JobDefinition", container=container,
                                                retry_attempts=1, propagate_tags=True)
            self.batch_runners[str(runner)] = (queue, definition)

    # -- what the workflow, the functions and the rules need ------------------------------------
    @property
    def placements(self) -> dict[str, dict[str, str]]:
        """KILN_RUNNER_PLACEMENTS: each Batch runner's queue and job definition ARNs."""
        return {runner: {"JobQueue": queue.job_queue_arn, "JobDefinition": definition.job_definition_arn}
                for runner, (queue, definition) in self.batch_runners.items()}

    @property
    def task_role_arns(self) -> list[str]:
        """Roles the state machine passes to ECS when it runs the Fargate task."""
        if self.task_definition is None:
            return []
        return [self.task_definition.task_role.role_arn, self.task_definition.obtain_execution_role().role_arn]

    def task_arn_pattern(self) -> str:
        """Every task of Kiln's cluster (task IDs are chosen by ECS)."""
        return Stack.of(self).format_arn(service="ecs", resource="task",
                                         resource_name=f"{self.cluster.cluster_name}/*")

    def grant_find_and_stop(self, grantee: iam.IGrantable) -> None:
        """List, describe and stop compiler containers (the API's StopCompilationJob, the workflow's limits)."""
        stack = Stack.of(self)
        iam.Grant.add_to_principal(grantee=grantee, actions=["ecs:ListTasks"], resource_arns=["*"],
                                   conditions={"ArnEquals": {"ecs:cluster": self.cluster.cluster_arn}})
        iam.Grant.add_to_principal(grantee=grantee, actions=["ecs:DescribeTasks", "ecs:StopTask"],
                                   resource_arns=[self.task_arn_pattern()],
                                   conditions={"ArnEquals": {"ecs:cluster": self.cluster.cluster_arn}})
        if self.batch_runners:
            iam.Grant.add_to_principal(grantee=grantee, actions=["batch:ListJobs", "batch:DescribeJobs"],
                                       resource_arns=["*"])
            iam.Grant.add_to_principal(grantee=grantee, actions=["batch:TerminateJob"],
                                       resource_arns=[stack.format_arn(service="batch", resource="job",
                                                                       resource_name="*")])
