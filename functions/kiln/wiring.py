"""The composition root: build Kiln's services from settings and boto3 clients."""

from __future__ import annotations

import functools
from typing import Any

import boto3

from kiln.catalog import TargetCatalog
from kiln.config import KilnSettings, settings
from kiln.events import JobEvents
from kiln.runners import CompilerContainers
from kiln.service import CompilationJobService
from kiln.store import JobStore
from kiln.workflow import WorkflowSteps


def build_containers(config: KilnSettings, session: Any) -> CompilerContainers:
    return CompilerContainers(ecs=session.client("ecs"), batch=session.client("batch"),
                              sfn=session.client("stepfunctions"), cluster=config.ecs_cluster,
                              family=config.compiler_task_family, gpu_queue=config.gpu_job_queue,
                              batch_queues=[p["JobQueue"] for p in config.runner_placements.values() if "JobQueue" in p])


def build_service(config: KilnSettings, session: Any | None = None) -> CompilationJobService:
    """A service wired to the AWS resources named in ``config``."""
    session = session or boto3.session.Session(region_name=config.region)
    sfn = session.client("stepfunctions")
    store = JobStore(config.table_name, pagination_key=config.pagination_key,
                     max_active_jobs=config.max_active_jobs, dynamodb=session.resource("dynamodb"))
    containers = build_containers(config, session)
    network = {"Subnets": [s for s in config.subnets.split(",") if s],
               "SecurityGroups": [g for g in config.security_groups.split(",") if g]}
    return CompilationJobService(
        store=store, catalog=TargetCatalog(), sfn=sfn,
        events=JobEvents(session.client("events"), config.event_bus_name), containers=containers,
        state_machine_arn=config.state_machine_arn, region=config.region, account=config.account_id,
        network=network, iam=session.client("iam") if config.check_pass_role else None,
        enabled_runners=frozenset(r for r in config.enabled_runners.split(",") if r),
        placements=config.runner_placements)


def build_workflow_steps(config: KilnSettings, session: Any | None = None) -> WorkflowSteps:
    """The workflow's steps, over a service wired like the API's."""
    session = session or boto3.session.Session(region_name=config.region)
    return WorkflowSteps(build_service(config, session), sagemaker=session.client("sagemaker"),
                         containers=build_containers(config, session), inference_image=config.inference_image)


@functools.cache
def default_service() -> CompilationJobService:
    """The process-wide service (one per Lambda container)."""
    return build_service(settings())
