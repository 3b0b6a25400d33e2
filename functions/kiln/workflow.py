"""The workflow's steps: what each Lambda state of ``statemachine/compilation_job.asl.json`` does."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kiln import rules
from kiln.errors import ConflictError, error_code, is_retryable
from kiln.inference_images import inference_image
from kiln.job_metrics import take_census
from kiln.runners import STOPPED_ERROR, CompilerContainers
from kiln.service import CompilationJobService

log = logging.getLogger(__name__)
# SIGKILL: 137 as ECS and Batch report it (128 + 9), -9 as a local process reports it.
KILLED_EXIT_CODES = (137, -9)
# A compiler container's own MaxRuntimeInSeconds watchdog fired (kiln_compiler.__main__); its cause is the reason.
RUNTIME_EXCEEDED_ERROR = "Kiln.MaxRuntimeExceeded"
LIMIT_ERRORS = ("States.Timeout", "States.HeartbeatTimeout", RUNTIME_EXCEEDED_ERROR)


class TransientError(Exception):
    """A retryable failure (throttling, a lost race worth retrying); the state machine retries it."""


class JobClientError(Exception):
    """The job's input is at fault; recorded as ``ClientError: ...``."""


class JobServerError(Exception):
    """Kiln is at fault (e.g. the compiler broke its contract with the workflow); ``ServerError: ...``."""


def failure_reason(error: dict[str, Any] | None, limits: dict[str, Any] | None) -> str:
    """A SageMaker-style FailureReason for a caught workflow error (never a stack trace)."""
    error = error or {}
    limits = limits or {}
    name = str(error.get("Error", ""))
    cause = str(error.get("Cause", "") or "")
    if name == "States.HeartbeatTimeout":
        return (f"ClientError: the compiler container did not start, or stopped responding, within "
                f"MaxPendingTimeInSeconds ({limits.get('MaxPendingTimeInSeconds')} s)")
    if name == "States.Timeout":
        return f"ClientError: the compilation exceeded MaxRuntimeInSeconds ({limits.get('MaxRuntimeInSeconds')} s)"
    if name == RUNTIME_EXCEEDED_ERROR and cause.startswith("ClientError:"):
        return cause
    if name in ("ClientError", "ServerError"):
        return cause if cause.startswith(f"{name}:") else f"{name}: {cause}"
    message = cause
    try:
        payload = json.loads(cause)
        if isinstance(payload, dict):
            name = str(payload.get("errorType", name))
            message = str(payload.get("errorMessage", cause))
    except ValueError:
        pass
    if name == "JobClientError":
        return f"ClientError: {message}"
    if name == "JobServerError":
        return f"ServerError: {message}"
    short = message.splitlines()[0][:300] if message else "no details"
    return f"ServerError: {name or 'unknown error'}: {short}"


class WorkflowSteps:
    """Each Lambda step of the state machine, over the same service the API uses."""

    def __init__(self, service: CompilationJobService, *, sagemaker: Any,
                 containers: CompilerContainers | None, inference_image: str = "",
                 inference_images: dict[str, str] | None = None) -> None:
        self._service = service
        self._sagemaker = sagemaker
        self._containers = containers
        self._inference_image = inference_image  # any target's, when no family image applies
        self._inference_images = inference_images or {}  # per serving family, for ml_* targets

    def mark_in_progress(self, job: dict[str, Any]) -> dict[str, Any]:
        """STARTING -> INPROGRESS; ``Proceed: false`` when the job was stopped before it started."""
        name = job["CompilationJobName"]
        try:
            self._service.mark_in_progress(name)
        except ConflictError:
            status = self._service.store.get(name)["CompilationJobStatus"]
            if status == "INPROGRESS":  # a retried step whose first attempt did land
                return {"Proceed": True}
            if status == "STARTING":  # the write lost a race but the job is still to start: retry
                raise TransientError(f"job {name} is still STARTING after a conflicting write") from None
            log.info("job %s is %s; not compiling", name, status)
            return {"Proceed": False}
        return {"Proceed": True}

    def resolve_model_package(self, job: dict[str, Any]) -> dict[str, Any]:
        """Fill InputConfig from the model package version (S3Uri, Framework, version, inputs)."""
        arn = job["ModelPackageVersionArn"]
        try:
            package = self._sagemaker.describe_model_package(ModelPackageName=arn)
        except Exception as exc:
            if is_retryable(exc):
                raise TransientError(error_code(exc)) from exc
            raise JobClientError(f"ModelPackageVersionArn: could not describe {arn} ({error_code(exc)})") from exc
        containers = package.get("InferenceSpecification", {}).get("Containers", [])
        if not containers or not containers[0].get("ModelDataUrl"):
            raise JobClientError(f"ModelPackageVersionArn: {arn} has no container with a ModelDataUrl")
        container = containers[0]
        framework = (container.get("Framework") or "").upper()
        if not framework:
            raise JobClientError(f"ModelPackageVersionArn: {arn} does not name its Framework")
        input_config: dict[str, Any] = {"S3Uri": container["ModelDataUrl"], "Framework": framework}
        if container.get("FrameworkVersion") and framework in rules.FRAMEWORK_VERSION_FRAMEWORKS:
            input_config["FrameworkVersion"] = container["FrameworkVersion"]
        data_input = (container.get("ModelInput") or {}).get("DataInputConfig")
        if data_input:
            input_config["DataInputConfig"] = data_input
        target = self._service.catalog.for_output_config(job["OutputConfig"])
        try:
            options = rules.parse_compiler_options(job["OutputConfig"].get("CompilerOptions"), target)
            rules.check_framework_target(framework, target, options)
            rules.parse_data_input_config(data_input, framework, target, options.get("dtype", "float32"))
        except rules.RuleError as exc:
            raise JobClientError(f"ModelPackageVersionArn: {exc.message}") from None
        if not input_config["S3Uri"].endswith(".tar.gz"):
            raise JobClientError(f"ModelPackageVersionArn: the ModelDataUrl of {arn} must be a .tar.gz archive")
        # Describe shows the resolved input, as SageMaker does for package-based jobs.
        self._service.store.set_fields(job["CompilationJobName"], {"InputConfig": input_config})
        return {"Job": {**job, "InputConfig": input_config}}

    def plan_build(self, job: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
        """After a fanned-out job's tuning workers: the limits for its build, whose state timeout
        (``TotalSeconds``) becomes what is left of MaxPendingTimeInSeconds + MaxRuntimeInSeconds since the
        job started, so the limits hold for the whole job (ADR 0023). At least 1 s: a job already past
        them times out at once and is recorded as exceeding MaxRuntimeInSeconds."""
        record = self._service.store.get(job["CompilationJobName"])
        started = float(record.get("CompilationStartTime") or time.time())
        total = int(limits.get("TotalSeconds") or 0)
        left = max(1, int(total - (time.time() - started)))
        return {**limits, "TotalSeconds": min(total, left)}

    def record_success(self, job: dict[str, Any], result: dict[str, Any],
                       tuning_workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if not result.get("S3ModelArtifacts") or not result.get("ArtifactDigest"):
            # The compiler's output is Kiln's contract, not the user's input.
            raise JobServerError("the compiler reported success without an artifact")
        target = self._service.catalog.for_output_config(job["OutputConfig"])
        image = inference_image(target, self._inference_images, self._inference_image)
        record = self._service.record_success(job["CompilationJobName"], result, image, tuning_workers or [])
        return {"Recorded": record is not None}

    def record_failure(self, job: dict[str, Any], error: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
        name = job["CompilationJobName"]
        if error.get("Error") in LIMIT_ERRORS and self._containers is not None:
            # A limit was hit: the container (and a fanned-out job's other tuning workers) must not run on.
            self._containers.stop(name, failure_reason(error, limits))
        if error.get("Error") == STOPPED_ERROR:
            record = self._service.record_failure(name, "ClientError: the job was stopped")
        else:
            record = self._service.record_failure(name, failure_reason(error, limits))
        return {"Recorded": record is not None}

    def census(self) -> dict[str, Any]:
        """Active jobs by status and those running past their limits (scheduled; kiln.job_metrics)."""
        census = take_census(self._service.store)
        if census.overdue:
            log.warning("jobs running past MaxPendingTimeInSeconds + MaxRuntimeInSeconds: %s", census.overdue)
        return {"ByStatus": census.by_status, "Overdue": census.overdue, "Metrics": census.metrics()}

    def container_stopped(self, job_name: str | None, token: str | None, exit_code: int | None,
                          reason: str) -> dict[str, Any]:
        """A compiler container stopped: if it had not reported, fail its task token now
        (the exit code decides; the workflow does not wait for a heartbeat timeout)."""
        if not token or self._containers is None:
            return {"Failed": False}
        if exit_code == 0:
            cause = "ServerError: the compiler container exited without reporting a result"
        elif exit_code is None:
            cause = f"ServerError: the compiler container stopped ({reason or 'no exit code'})"
        else:
            cause = f"ServerError: the compiler container exited with code {exit_code}" + (
                f" ({reason})" if reason else "")
            if exit_code in KILLED_EXIT_CODES:
                cause += "; it was killed (SIGKILL), most often for running out of memory"
        # Lands only if the container had not reported: a closed token refuses it.
        self._containers.fail_token(token, "ServerError", cause)
        log.debug("container of %s stopped (exit %s)", job_name, exit_code)
        return {"Failed": True}
