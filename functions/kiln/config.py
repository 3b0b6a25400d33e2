"""Typed configuration of Kiln's functions.

In AWS, CDK sets ``KILN_*`` environment variables on the Lambdas and
:meth:`KilnSettings.from_environment` reads them (once, through :mod:`kiln.wiring`). Local mode
never touches the environment: it builds a ``KilnSettings`` for its own resources and injects it.
Settings that name a deployment's resources (the table, the state machine, the token-signing key...)
have no default: a function started without them fails at start, naming what is missing.
"""

from __future__ import annotations

import os
from typing import Any

import pydantic
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln.inference_images import check_families

ENV_PREFIX = "KILN_"


class SettingsError(Exception):
    """The settings are incomplete or invalid; the message names every offending ``KILN_*`` variable."""


class KilnSettings(BaseSettings):
    """Everything a Kiln function needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True)

    region: str = Field(default="us-east-1", validation_alias="AWS_REGION")
    # Required: the deployment's resources (no default that could point at someone else's).
    account_id: str = ""
    table_name: str = ""
    state_machine_arn: str = ""
    # Key that signs ListCompilationJobs NextTokens (a forged or altered token is refused).
    pagination_key: str = ""
    event_bus_name: str = "default"
    max_active_jobs: int = Field(default=20, ge=1)
    inference_image: str = ""
    # Job metrics as CloudWatch EMF records on stdout (Lambda's log stream); local mode turns them off.
    emit_metrics: bool = True
    # Required while the fargate runner is enabled.
    # Serving image per family for ml_* targets, JSON: {"x86_64": uri, "aarch64": uri, "cuda": uri}
    # (kiln.inference_images); a family left out falls back to inference_image.
    inference_images: dict[str, str] = Field(default_factory=dict)
    ecs_cluster: str = ""
    compiler_task_family: str = "kiln-compiler"
    # Required while the batch-gpu runner is enabled.
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
    registry_max_runtime_seconds: int = Field(default=900, ge=1)

    @model_validator(mode="after")
    def _deployment_is_named(self) -> KilnSettings:
        missing = [name for name in ("account_id", "table_name", "state_machine_arn", "pagination_key")
                   if not getattr(self, name)]
        runners = self.runners()
        if "fargate" in runners and not self.ecs_cluster:
            missing.append("ecs_cluster")
        if "batch-gpu" in runners and not self.gpu_job_queue:
            missing.append("gpu_job_queue")
        if missing:
            names = ", ".join(ENV_PREFIX + name.upper() for name in missing)
            raise ValueError(f"required settings are not set: {names}")
        return self

    def runners(self) -> frozenset[str]:
        """The enabled runners (``enabled_runners`` as a set)."""
        return frozenset(r.strip() for r in self.enabled_runners.split(",") if r.strip())

    def network(self) -> dict[str, list[str]]:
        """The default awsvpc network of compiler tasks (jobs without VpcConfig)."""
        return {"Subnets": [s for s in self.subnets.split(",") if s],
                "SecurityGroups": [g for g in self.security_groups.split(",") if g]}

    @classmethod
    def from_environment(cls) -> KilnSettings:
        """The settings CDK gave this function (``KILN_*`` variables); ``SettingsError`` when incomplete."""
        try:
            return cls()
        except pydantic.ValidationError as exc:
            where = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
            problems = "; ".join(_problem(error) for error in exc.errors())
            raise SettingsError(f"Kiln cannot start{f' in Lambda function {where}' if where else ''}: "
                                f"{problems}") from None

    @field_validator("inference_images")
    @classmethod
    def _serving_families(cls, value: dict[str, str]) -> dict[str, str]:
        check_families(value, "KILN_INFERENCE_IMAGES")
        return value


def _problem(error: Any) -> str:
    """One pydantic error as ``VARIABLE: message``."""
    loc = error.get("loc") or ()
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if not loc:
        return message
    field = str(loc[0])
    variable = "AWS_REGION" if field == "region" else ENV_PREFIX + field.upper()
    return f"{variable}: {message}"
