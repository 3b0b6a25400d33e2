"""The composition root: Kiln's service, workflow steps and registry hook, built from typed settings.

Every entrypoint gets its objects here and nowhere else. A :class:`Kiln` holds one deployment's
settings and AWS clients and builds each part once, on first use. The process has one current
``Kiln`` (:func:`current`): in Lambda it is built from the environment on first use (a function
whose settings are incomplete fails at start, see :func:`start_in_lambda`); local mode and tests
:func:`install` their own. This module is the only place that caches.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Protocol

import boto3

from kiln import job_metrics
from kiln.catalog import TargetCatalog
from kiln.config import KilnSettings
from kiln.events import JobEvents
from kiln.registry import RegistryConfig, RegistryHook
from kiln.runners import CompilerContainers
from kiln.service import CompilationJobService
from kiln.store import JobStore
from kiln.workflow import WorkflowSteps


class AwsClients(Protocol):
    """What the composition needs from a boto3 session (local mode passes one bound to its endpoint)."""

    def client(self, service_name: str) -> Any: ...

    def resource(self, service_name: str) -> Any: ...


class Kiln:
    """One deployment's parts over one set of clients, each built once, on first use.

    ``workflow_steps`` may be given to keep the steps of an earlier composition (a test serving
    the API with other settings while running workflows finish on the stack's)."""

    def __init__(self, settings: KilnSettings, clients: AwsClients | None = None, *,
                 workflow_steps: WorkflowSteps | None = None) -> None:
        self.settings = settings
        self.clients: AwsClients = clients or boto3.session.Session(region_name=settings.region)
        if workflow_steps is not None:
            self.__dict__["workflow_steps"] = workflow_steps

    @functools.cached_property
    def containers(self) -> CompilerContainers:
        config = self.settings
        return CompilerContainers(ecs=self.clients.client("ecs"), batch=self.clients.client("batch"),
                                  sfn=self.clients.client("stepfunctions"), cluster=config.ecs_cluster,
                                  family=config.compiler_task_family, gpu_queue=config.gpu_job_queue,
                                  batch_queues=[p["JobQueue"] for p in config.runner_placements.values()
                                                if "JobQueue" in p])

    @functools.cached_property
    def service(self) -> CompilationJobService:
        """The compilation-job service the API, the workflow and the registry hook share."""
        config, clients = self.settings, self.clients
        store = JobStore(config.table_name, pagination_key=config.pagination_key,
                         max_active_jobs=config.max_active_jobs, dynamodb=clients.resource("dynamodb"))
        return CompilationJobService(
            store=store, catalog=TargetCatalog(), sfn=clients.client("stepfunctions"),
            events=JobEvents(clients.client("events"), config.event_bus_name, emit_metrics=self.emit_metrics),
            containers=self.containers,
            state_machine_arn=config.state_machine_arn, region=config.region, account=config.account_id,
            network=config.network(), iam=clients.client("iam") if config.check_pass_role else None,
            enabled_runners=config.runners(), placements=config.runner_placements)

    def emit_metrics(self, metrics: list[job_metrics.Metric]) -> None:
        """Publish job metrics (CloudWatch EMF), unless the settings turn them off."""
        if self.settings.emit_metrics:
            job_metrics.emit(metrics)

    @functools.cached_property
    def workflow_steps(self) -> WorkflowSteps:
        """The state machine's Lambda steps, over the same service."""
        return WorkflowSteps(self.service, sagemaker=self.clients.client("sagemaker"), containers=self.containers,
                             inference_image=self.settings.inference_image,
                             inference_images=self.settings.inference_images)

    @functools.cached_property
    def registry_hook(self) -> RegistryHook:
        """The model-registry hook, creating jobs through the same service."""
        return RegistryHook(self.service, self.clients.client("sagemaker"), RegistryConfig.from_settings(self.settings))


_lock = threading.Lock()
_current: Kiln | None = None


def current() -> Kiln:
    """The process's composition: the installed one, else one built from the environment (Lambda)."""
    global _current
    with _lock:
        if _current is None:
            _current = Kiln(KilnSettings.from_environment())
        return _current


def install(kiln: Kiln | None) -> Kiln | None:
    """Make ``kiln`` the process's composition (``None``: rebuild from the environment on next use);
    returns the one it replaces, so the caller can put it back."""
    global _current
    with _lock:
        previous, _current = _current, kiln
        return previous


def start_in_lambda() -> None:
    """Build the composition at import time when running in Lambda, so a function deployed with
    incomplete settings fails its cold start with :class:`kiln.config.SettingsError` naming them."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        current()
