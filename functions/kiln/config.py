"""Runtime configuration of Kiln's functions, read from ``KILN_*`` environment variables.

CDK sets these on the Lambdas; the local stack sets them for its in-process handlers.
"""

from __future__ import annotations

import functools

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KilnSettings(BaseSettings):
    """Everything a Kiln function needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    region: str = Field(default="us-east-1", validation_alias="AWS_REGION")
    account_id: str = "000000000000"
    table_name: str = "kiln-jobs"
    state_machine_arn: str = ""
    event_bus_name: str = "default"
    max_active_jobs: int = 20
    # Key that signs ListCompilationJobs NextTokens (a forged or altered token is refused).
    pagination_key: str = "kiln-local-pagination-key"
    inference_image: str = ""
    ecs_cluster: str = ""
    compiler_task_family: str = "kiln-compiler"
    gpu_job_queue: str = ""
    # Comma-separated subnets and security groups for compiler tasks of jobs without VpcConfig.
    subnets: str = ""
    security_groups: str = ""
    # Comma-separated runners this deployment has (kiln.catalog.Runner values); others are refused.
    enabled_runners: str = "fargate,batch-gpu"
    # JSON: Batch runner -> {"JobQueue": ARN, "JobDefinition": ARN} (what the state machine submits to).
    runner_placements: dict[str, dict[str, str]] = Field(default_factory=dict)
    # Whether the API checks that the caller may iam:PassRole the job's RoleArn.
    check_pass_role: bool = False
    # Registry hook: where registry-started jobs write, with which role and limits.
    registry_output_s3: str = ""
    registry_role_arn: str = ""
    registry_default_targets: str = ""
    registry_max_runtime_seconds: int = 900


@functools.cache
def settings() -> KilnSettings:
    """The process's settings (read once; tests call ``settings.cache_clear()``)."""
    return KilnSettings()
