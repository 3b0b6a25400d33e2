"""Deployment configuration: a pydantic model read from CDK context (key ``kiln``).

Every field has a documented default, so ``cdk deploy`` with no context gives a working,
locked-down service. Override with ``cdk deploy -c kiln='{"max_active_jobs": 50}'`` or in
``infra/cdk.json`` under ``context.kiln``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from kiln.catalog import RUNNERS, Runner
from pydantic import BaseModel, ConfigDict, Field, model_validator

TargetFamily = Literal["cpu", "gpu"]
# Serving image families (kiln.inference_images.SERVING_FAMILIES): x86-64 CPU, Graviton, NVIDIA.
ServingFamily = Literal["x86_64", "aarch64", "cuda"]
SERVING_FAMILIES: tuple[ServingFamily, ...] = ("x86_64", "aarch64", "cuda")

# CloudWatch Logs accepts only these retention periods (days).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
                      2192, 2557, 2922, 3288, 3653)


class ImportedVpc(BaseModel):
    """An existing VPC to run compilers in (instead of creating one).

    It must already have private subnets without a route to the internet and the VPC endpoints
    the compilers need (see docs/adr/0006): S3 gateway, ECR api/dkr, CloudWatch Logs, Step
    Functions, STS, and for GPU (Batch on EC2) also ECS, ECS agent and ECS telemetry.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vpc_id: str = Field(pattern=r"^vpc-[0-9a-f]+$")
    subnet_ids: tuple[str, ...] = Field(min_length=1)
    availability_zones: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> ImportedVpc:
        if len(self.subnet_ids) != len(self.availability_zones):
            raise ValueError("subnet_ids and availability_zones must have the same length (one AZ per subnet)")
        return self


class KilnConfig(BaseModel):
    """What an operator may choose at deploy time; defaults are production-safe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Most jobs STARTING/INPROGRESS/STOPPING at once (ResourceLimitExceeded beyond; KILN_MAX_ACTIVE_JOBS).
    max_active_jobs: int = Field(default=20, ge=1, le=10_000)
    # Which runners to deploy: "cpu" = ECS Fargate, "gpu" = AWS Batch on NVIDIA EC2 instances.
    target_families: tuple[TargetFamily, ...] = ("cpu", "gpu")
    # Tags of the compiler images. "asset" builds them from compiler-container/ at deploy (cdk deploy
    # runs docker build); anything else names a tag in compiler_repository (prebuilt images).
    cpu_image_tag: str = "asset"
    gpu_image_tag: str = "asset"
    # Name of an ECR repository (same account and region) holding prebuilt compiler images.
    compiler_repository: str | None = None
    # Image the registry hook and the API record as the inference image (KILN_INFERENCE_IMAGE) of targets
    # without a serving image below (edge devices, or a family set to "").
    inference_image: str = ""
    # InferenceImage of ml_* jobs per serving family (KILN_INFERENCE_IMAGES): "asset" builds the family's
    # serving-container/ Dockerfile at deploy (cdk deploy runs docker build; ARM64 needs buildx/QEMU or an ARM
    # host), an image URI names a prebuilt image, "" records none. Families of disabled runners get none.
    serving_images: dict[ServingFamily, str] = Field(default_factory=lambda: dict.fromkeys(SERVING_FAMILIES, "asset"))
    # None: create a VPC with private isolated subnets and endpoints; otherwise import one.
    vpc: ImportedVpc | None = None
    # Availability zones of the created VPC.
    max_azs: int = Field(default=2, ge=1, le=6)
    # VPC flow logs (rejected and accepted traffic) to an encrypted log group.
    vpc_flow_logs: bool = True
    # Retention of every log group Kiln creates (days; one of CloudWatch's allowed values).
    log_retention_days: int = 365
    # DynamoDB deletion protection and RETAIN policies on stateful resources (table, key, logs).
    deletion_protection: bool = True
    # Where Kiln's "Compilation Job State Change" events go; "default" or a bus Kiln creates.
    event_bus_name: str = "default"
    # API Gateway stage throttling (requests per second and burst) for the whole stage.
    throttling_rate_limit: int = Field(default=50, ge=1)
    throttling_burst_limit: int = Field(default=100, ge=1)
    # Set the account-level API Gateway CloudWatch role (needed once per account and region for
    # execution logging). Turn off when the account already has one managed elsewhere.
    api_gateway_cloudwatch_role: bool = True
    # Fargate size of a CPU compile task (vCPU units and MiB) and its ephemeral storage (GiB).
    cpu_task_cpu: int = 4096
    cpu_task_memory_mib: int = 16384
    cpu_task_ephemeral_storage_gib: int = Field(default=60, ge=21, le=200)
    # Batch GPU compute environment: instance types and vCPU ceiling (0 minimum: scales to zero).
    gpu_instance_types: tuple[str, ...] = ("g4dn.xlarge", "g4dn.2xlarge")
    gpu_max_vcpus: int = Field(default=32, ge=1)
    gpu_job_vcpus: int = 4
    gpu_job_memory_mib: int = 15000
    # AWS Batch compute environments for CPU targets whose instance type matters, one per EC2 family of
    # kiln.catalog.RUNNERS (minimum 0 vCPUs: an idle family costs nothing). Jobs for a family not listed are
    # refused at create, except Graviton's (c6g, m6g, c7g: opt-in, since they add the arm64 compiler image),
    # which are then cross-built on Fargate without a measurement.
    cpu_instance_families: tuple[str, ...] = ("c4", "m4", "c5", "m5", "c6i")
    cpu_family_max_vcpus: int = Field(default=64, ge=1)
    cpu_family_job_vcpus: int = Field(default=4, ge=1)
    cpu_family_job_memory_mib: int = Field(default=7168, ge=512)
    # The shared tuning database (KILN_TUNING_DB): a versioned, KMS-encrypted, TLS-only S3 bucket with one prefix per
    # runner that every tuning-capable compiler (Fargate, each CPU family) reads and writes, so a job and its tuning
    # workers reuse what earlier jobs on that runner measured (docs/adr/0023). false: no bucket, each job tunes
    # into a database of its own (its fanned-out workers still hand their records to its build).
    shared_tuning_database: bool = True
    # Tag of the arm64 compiler image ("asset": built from compiler-container/Dockerfile for linux/arm64).
    arm64_image_tag: str = "asset"
    # The UID the compiler runs as (must match the USER of compiler-container/Dockerfile*).
    compiler_user: str = "10001"
    # Registry hook (SageMaker Model Package State Change → compilation jobs).
    registry_output_s3: str = ""
    registry_role_arn: str = ""
    registry_default_targets: str = ""
    # Operators' alarms (kiln_infra.monitoring): the SNS topic they notify (ALARM and OK), in this
    # account and region; empty: the alarms exist (and show on the dashboard) without an action.
    alarm_topic_arn: str = Field(default="", pattern=r"^(arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256})?$")
    # FailedJobRate alarms when at least this share of the jobs finished in 15 minutes FAILED (3 jobs or more).
    alarm_failed_job_rate: float = Field(default=0.5, gt=0, le=1)
    # ApiServerErrors alarms at this many 5xx answers in 5 minutes.
    alarm_api_server_errors: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> KilnConfig:
        if not self.target_families:
            raise ValueError("target_families must enable at least one of 'cpu', 'gpu'")
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            raise ValueError(f"log_retention_days must be one of {LOG_RETENTION_DAYS}")
        families = {spec.instance_family for spec in RUNNERS.values() if spec.platform == "batch" and not spec.gpu}
        unknown = sorted(set(self.cpu_instance_families) - families)
        if unknown:
            raise ValueError(f"cpu_instance_families {unknown} are not runner families of the catalog "
                             f"(one of {sorted(f for f in families if f)})")
        prebuilt = [tag for tag in (self.cpu_image_tag, self.gpu_image_tag, self.arm64_image_tag) if tag != "asset"]
        if prebuilt and not self.compiler_repository:
            raise ValueError("image tags other than 'asset' need compiler_repository")
        if any(any(c.isspace() for c in uri) for uri in self.serving_images.values()):
            raise ValueError("serving_images values are 'asset', '' or an image URI (no spaces)")
        if self.event_bus_name.startswith("arn:"):
            raise ValueError("event_bus_name is a name in this account, not an ARN")
        return self

    @property
    def cpu_enabled(self) -> bool:
        return "cpu" in self.target_families

    @property
    def gpu_enabled(self) -> bool:
        return "gpu" in self.target_families

    @property
    def batch_cpu_runners(self) -> tuple[Runner, ...]:
        """The catalog's Batch CPU runners this deployment creates (none without "cpu" in target_families)."""
        if not self.cpu_enabled:
            return ()
        return tuple(r for r, spec in RUNNERS.items()
                     if spec.platform == "batch" and not spec.gpu and spec.instance_family in self.cpu_instance_families)

    @property
    def enabled_runners(self) -> tuple[Runner, ...]:
        """Every runner this deployment has (KILN_ENABLED_RUNNERS): the API refuses targets of others."""
        fixed = ((Runner.FARGATE, self.cpu_enabled), (Runner.BATCH_GPU, self.gpu_enabled))
        return (*(r for r, on in fixed if on), *self.batch_cpu_runners)

    @classmethod
    def from_context(cls, value: Any) -> KilnConfig:
        """The config from the ``kiln`` context value (a dict, a JSON string from ``-c``, or None)."""
        if value is None:
            return cls()
        if isinstance(value, str):
            value = json.loads(value)
        return cls.model_validate(value)
