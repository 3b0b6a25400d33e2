"""Finding and stopping a job's compiler container (ECS Fargate task or AWS Batch job).

The workflow starts the container with ``runTask``/``submitJob`` ``.waitForTaskToken``; the
container's environment carries the job name and the task token. Stopping a job therefore
finds its container by that environment, stops it, and fails the token so the workflow state
waiting on it ends at once (Step Functions does not stop a ``.waitForTaskToken`` container).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

log = logging.getLogger(__name__)

STOPPED_ERROR = "Kiln.Stopped"


@dataclass(frozen=True)
class CompilerContainer:
    runner: str  # "ecs" or "batch"
    ident: str  # task ARN or Batch job id
    task_token: str | None


def _environment_of(overrides: list[dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for override in overrides:
        for pair in override.get("environment", []) or []:
            env[pair["name"]] = pair.get("value", "")
    return env


class CompilerContainers:
    """Locate and stop compiler containers of a job."""

    def __init__(self, *, ecs: Any, batch: Any, sfn: Any, cluster: str, family: str, gpu_queue: str,
                 batch_queues: Iterable[str] = ()) -> None:
        self._ecs, self._batch, self._sfn = ecs, batch, sfn
        self._cluster, self._family = cluster, family
        # every Batch queue a runner submits to (the GPU one and one per instance family), each once
        self._queues = tuple(dict.fromkeys(q for q in (gpu_queue, *batch_queues) if q))

    def find(self, job_name: str) -> list[CompilerContainer]:
        found: list[CompilerContainer] = []
        if self._cluster:
            arns = self._ecs.list_tasks(cluster=self._cluster, family=self._family,
                                        desiredStatus="RUNNING").get("taskArns", [])
            if arns:
                for task in self._ecs.describe_tasks(cluster=self._cluster, tasks=arns).get("tasks", []):
                    env = _environment_of(task.get("overrides", {}).get("containerOverrides", []))
                    if _job_name(env) == job_name:
                        found.append(CompilerContainer("ecs", task["taskArn"], env.get("KILN_TASK_TOKEN")))
        for queue in self._queues:
            for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"):
                listed = self._batch.list_jobs(jobQueue=queue, jobStatus=status).get("jobSummaryList", [])
                for summary in listed:
                    if summary.get("jobName") != job_name:
                        continue
                    detail = self._batch.describe_jobs(jobs=[summary["jobId"]])["jobs"][0]
                    env = {e["name"]: e.get("value", "") for e in detail.get("container", {}).get("environment", [])}
                    found.append(CompilerContainer("batch", summary["jobId"], env.get("KILN_TASK_TOKEN")))
        return found

    def stop(self, job_name: str, reason: str) -> int:
        """Stop every container of the job and fail its task token; the number stopped."""
        containers = self.find(job_name)
        for container in containers:
            try:
                if container.runner == "ecs":
                    self._ecs.stop_task(cluster=self._cluster, task=container.ident, reason=reason[:255])
                else:
                    self._batch.terminate_job(jobId=container.ident, reason=reason[:255])
            except ClientError:
                log.exception("could not stop %s %s", container.runner, container.ident)
            if container.task_token:
                self.fail_token(container.task_token, STOPPED_ERROR, reason)
        return len(containers)

    def fail_token(self, token: str, error: str, cause: str) -> None:
        try:
            self._sfn.send_task_failure(taskToken=token, error=error, cause=cause[:32768])
        except ClientError as exc:  # already answered or timed out: nothing left to end
            log.info("task token already closed: %s", exc.response["Error"]["Code"])


def _job_name(env: dict[str, str]) -> str | None:
    raw = env.get("KILN_JOB")
    if not raw:
        return None
    try:
        return json.loads(raw).get("CompilationJobName")
    except ValueError:
        return None
