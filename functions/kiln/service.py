"""The compilation-job service: what each API operation does, independent of transport."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from kiln import rules
from kiln.catalog import Runner, TargetCatalog
from kiln.contract import parse_timestamp, shape_output, validate_request
from kiln.errors import AccessDenied, ConflictError, ResourceNotFound, ValidationError
from kiln.events import JobEvents
from kiln.runners import CompilerContainers
from kiln.store import ACTIVE, TERMINAL, JobStore, ListQuery, public_view

log = logging.getLogger(__name__)

_ARN = re.compile(r"arn:aws[a-z\-]*:sagemaker:([a-z0-9\-]+):(\d{12}):compilation-job/([a-zA-Z0-9\-]+)")


# Time filters are clamped to what a job's times can be, to the microsecond: any timestamp is a valid
# filter, but DynamoDB numbers stop at 1E-130 / 9.9E125 (5.97e-196 answered 500 in the fuzzer).
_EARLIEST, _LATEST = 0.0, 1e11


def _time_filter(value: Any) -> float | None:
    seconds = parse_timestamp(value)
    return None if seconds is None else round(min(max(seconds, _EARLIEST), _LATEST), 6)


def job_arn(region: str, account: str, name: str) -> str:
    return f"arn:aws:sagemaker:{region}:{account}:compilation-job/{name}"


# Kiln's extension of DescribeCompilationJob: one member outside SageMaker's shape, which stock clients
# (botocore parses only the members its model names) ignore; see docs/adr/0017.
EXTENSION = "Kiln"
# How long (per process) an execution seen running is not asked again whether it ended without
# recording a result (:meth:`CompilationJobService._reconcile`): a client polling Describe would
# otherwise cost a Step Functions DescribeExecution per call (throttled per account in AWS; a
# second round trip per Describe of an active job locally, ~30 % of its CPU: ADR 0037). A lost
# result then shows at most this much later.
EXECUTION_RECHECK_SECONDS = 5.0


def describe_view(record: dict[str, Any]) -> dict[str, Any]:
    """A DescribeCompilationJob response from a stored record (required members always present),
    plus the ``Kiln`` extension member when the job has one (profile, accuracy, runner, usage)."""
    view = public_view(record)
    view.setdefault("FailureReason", "")
    view.setdefault("ModelArtifacts", {"S3ModelArtifacts": ""})
    shaped = shape_output("DescribeCompilationJob", view)
    if record.get(EXTENSION):
        shaped[EXTENSION] = record[EXTENSION]
    return shaped


def worker_usage(result: dict[str, Any]) -> dict[str, Any]:
    """One tuning worker on the record, from what the Map state collected (its result, or its failure)."""
    usage: dict[str, Any] = {"Shard": str(result.get("Shard", "")), "Status": str(result.get("Status", "FAILED"))}
    if usage["Status"] == "COMPLETED":
        usage.update(Kernels=int(result.get("Kernels", 0)), Tuned=int(result.get("Tuned", 0)),
                     TaskSeconds=float((result.get("Timings") or {}).get("total", 0.0)))
    else:
        error = result.get("Error") or {}
        cause = str(error.get("Cause") or error.get("Error") or "no details")
        usage["Reason"] = cause.splitlines()[0][:300] if cause else "no details"
    return usage


def tuning_fan_out(job: dict[str, Any]) -> dict[str, Any]:
    """The execution input's ``Tuning`` (how many workers, one shard ``"i/N"`` each) and ``TuningWorkers``
    (their results, filled by the workflow's Map state; ADR 0023). One worker: no fan-out."""
    text = (job.get("OutputConfig") or {}).get("CompilerOptions")
    try:
        workers = rules.tuning_workers(rules.parse_compiler_options(text))
    except rules.RuleError:  # checked at create; a job that got here with bad options compiles and fails there
        workers = 1
    shards = [f"{i}/{workers}" for i in range(1, workers + 1)] if workers > 1 else []
    return {"Tuning": {"Workers": workers, "Shards": shards}, "TuningWorkers": []}


class CompilationJobService:
    """Create, describe, list, stop and delete compilation jobs; manage their tags."""

    def __init__(self, *, store: JobStore, catalog: TargetCatalog, sfn: Any, events: JobEvents,
                 containers: CompilerContainers | None, state_machine_arn: str, region: str, account: str,
                 network: dict[str, Any] | None = None, iam: Any | None = None,
                 enabled_runners: frozenset[str] | None = None,
                 placements: dict[str, dict[str, str]] | None = None,
                 execution_recheck_seconds: float = EXECUTION_RECHECK_SECONDS) -> None:
        self.store = store
        self.catalog = catalog
        self._sfn = sfn
        self._events = events
        self._containers = containers
        self._state_machine_arn = state_machine_arn
        self._region = region
        self._account = account
        self._network = network or {}
        self._iam = iam
        self._enabled_runners = enabled_runners
        self._placements = placements or {}
        self._recheck_seconds = execution_recheck_seconds
        self._seen_running: dict[str, float] = {}  # execution ARN -> when (monotonic) it was last seen running

    # -- create ------------------------------------------------------------------------------
    def create(self, request: dict[str, Any], *, caller_arn: str | None = None) -> dict[str, Any]:
        validate_request("CreateCompilationJob", request)
        target = rules.check_create(request, self.catalog)
        mcpu = rules.parse_compiler_options(request["OutputConfig"].get("CompilerOptions"), target).get("mcpu")
        runner = self.catalog.runner_for(target, mcpu)
        enabled = self._enabled_runners
        if enabled is not None and str(runner) not in enabled and str(runner.spec.fallback) in enabled:
            runner = runner.spec.fallback or runner
        if enabled is not None and str(runner) not in enabled:
            raise ValidationError(
                f"Target '{target.name}' needs the '{runner}' compiler runner, which this deployment has "
                f"not enabled (enabled: {', '.join(sorted(enabled)) or 'none'})")
        rules.check_stopping_condition(request.get("StoppingCondition"))
        rules.check_tags(request.get("Tags"))
        if self._iam is not None and caller_arn:
            self._check_pass_role(caller_arn, request["RoleArn"])
        name = request["CompilationJobName"]
        now = time.time()
        runtime, pending = rules.stopping_limits(request.get("StoppingCondition"))
        job: dict[str, Any] = {
            "CompilationJobName": name,
            "CompilationJobArn": job_arn(self._region, self._account, name),
            "CompilationJobStatus": "STARTING",
            "RoleArn": request["RoleArn"],
            "OutputConfig": request["OutputConfig"],
            "StoppingCondition": {**request.get("StoppingCondition", {}), "MaxRuntimeInSeconds": runtime,
                                  "MaxPendingTimeInSeconds": pending},
            "CreationTime": now,
            "LastModifiedTime": now,
        }
        for optional in ("InputConfig", "ModelPackageVersionArn", "VpcConfig"):
            if request.get(optional) is not None:
                job[optional] = request[optional]
        # The execution's ARN is known before it starts (it is named after the job): recorded with the
        # job in its one transaction, not by a second write after StartExecution (ADR 0058).
        execution = self.execution_arn(name)
        self.store.create(job, extra={"Tags": request.get("Tags", []), "Runner": str(runner),
                                      **({"ExecutionArn": execution} if execution else {})})
        self._events.state_changed(describe_view(job))
        self.start_workflow(job, str(runner), runtime, pending, recorded_arn=execution)
        return {"CompilationJobArn": job["CompilationJobArn"]}

    def execution_arn(self, name: str) -> str | None:
        """The ARN Step Functions gives the execution named ``name`` of Kiln's state machine
        (``arn:<partition>:states:<region>:<account>:execution:<machine>:<name>``); None without one."""
        prefix, marker, machine = self._state_machine_arn.rpartition(":stateMachine:")
        return f"{prefix}:execution:{machine}:{name}" if marker and machine else None

    def start_workflow(self, job: dict[str, Any], runner: str, runtime: int, pending: int,
                       recorded_arn: str | None = None) -> None:
        """Start the job's execution (named after the job); a failed start records the job FAILED.
        The execution's ARN is written to the job unless ``recorded_arn`` (written with it) is that ARN."""
        name = job["CompilationJobName"]
        execution_input = {
            "Job": {k: v for k, v in job.items() if k not in ("CompilationJobStatus", "CreationTime",
                                                                "LastModifiedTime")},
            "Runner": runner,
            "Placement": self.placement(runner),
            "Limits": {"MaxRuntimeInSeconds": runtime, "MaxPendingTimeInSeconds": pending,
                       "TotalSeconds": runtime + pending},
            "Network": self._network_for(job.get("VpcConfig")),
            **tuning_fan_out(job),
        }
        try:
            started = self._sfn.start_execution(stateMachineArn=self._state_machine_arn, name=name,
                                                input=json.dumps(execution_input))
            if started["executionArn"] != recorded_arn:
                self.store.set_fields(name, {"ExecutionArn": started["executionArn"]})
        except Exception as exc:
            log.exception("could not start the workflow of %s", name)
            detail = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
            self.record_failure(name, f"ServerError: the compilation workflow could not be started ({detail})")

    def placement(self, runner: str) -> dict[str, str]:
        """Where the state machine starts the runner's container: ``{"Platform": "ecs"}`` (the Fargate task
        definition is the workflow's own) or ``{"Platform": "batch", "JobQueue", "JobDefinition"}``."""
        platform = Runner(runner).spec.platform
        return {"Platform": platform, **self._placements.get(runner, {})}

    def _network_for(self, vpc_config: dict[str, Any] | None) -> dict[str, Any]:
        if vpc_config:
            return {"Subnets": vpc_config["Subnets"], "SecurityGroups": vpc_config["SecurityGroupIds"],
                    "AssignPublicIp": "DISABLED"}
        return {"Subnets": self._network.get("Subnets", []),
                "SecurityGroups": self._network.get("SecurityGroups", []), "AssignPublicIp": "DISABLED"}

    def _check_pass_role(self, caller_arn: str, role_arn: str) -> None:
        """The caller must be allowed to pass the job's role (as SageMaker requires iam:PassRole)."""
        assert self._iam is not None
        principal = _principal_arn(caller_arn)
        try:
            result = self._iam.simulate_principal_policy(PolicySourceArn=principal, ActionNames=["iam:PassRole"],
                                                         ResourceArns=[role_arn])
        except ClientError as exc:
            raise AccessDenied(f"Could not verify that {principal} may pass role {role_arn}: "
                               f"{exc.response['Error']['Code']}") from None
        decisions = [r["EvalDecision"] for r in result.get("EvaluationResults", [])]
        if decisions != ["allowed"]:
            raise AccessDenied(f"User: {caller_arn} is not authorized to perform: iam:PassRole on resource: {role_arn}")

    # -- describe / list ---------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        validate_request("DescribeCompilationJob", {"CompilationJobName": name})
        record = self.store.get(name)
        if record["CompilationJobStatus"] in ACTIVE:
            record = self._reconcile(record)
        return describe_view(record)

    def _reconcile(self, record: dict[str, Any]) -> dict[str, Any]:
        """A job whose workflow ended without recording a result is failed, not left running."""
        arn = record.get("ExecutionArn")
        if not arn:
            return record
        now = time.monotonic()
        if now - self._seen_running.get(arn, -self._recheck_seconds) < self._recheck_seconds:
            return record
        try:
            execution = self._sfn.describe_execution(executionArn=arn)
        except ClientError:
            return record
        status = execution.get("status")
        if status in (None, "RUNNING", "PENDING_REDRIVE"):
            if len(self._seen_running) >= 10_000:  # bounded: ended jobs' entries go with the rest
                self._seen_running.clear()
            self._seen_running[arn] = now
            return record
        self._seen_running.pop(arn, None)
        name = record["CompilationJobName"]
        fresh = self.store.get(name)
        if fresh["CompilationJobStatus"] not in ACTIVE:
            return fresh
        if fresh["CompilationJobStatus"] == "STOPPING" or status == "ABORTED":
            return self._finish_stop(name) or self.store.get(name)
        return self.record_failure(
            name, f"ServerError: the compilation workflow ended ({status}) without recording a result") or fresh

    def list(self, request: dict[str, Any]) -> dict[str, Any]:
        validate_request("ListCompilationJobs", request)
        query = ListQuery(
            sort_by=request.get("SortBy", "CreationTime"),
            sort_order=request.get("SortOrder", "Ascending"),  # botocore documents both defaults
            max_results=int(request.get("MaxResults", 10)),
            name_contains=request.get("NameContains"),
            status_equals=request.get("StatusEquals"),
            created_after=_time_filter(request.get("CreationTimeAfter")),
            created_before=_time_filter(request.get("CreationTimeBefore")),
            modified_after=_time_filter(request.get("LastModifiedTimeAfter")),
            modified_before=_time_filter(request.get("LastModifiedTimeBefore")),
        )
        items, token = self.store.list(query, request.get("NextToken"))
        summaries = []
        for item in items:
            output = item.get("OutputConfig", {})
            summary = {
                "CompilationJobName": item["CompilationJobName"], "CompilationJobArn": item["CompilationJobArn"],
                "CreationTime": item["CreationTime"], "CompilationStartTime": item.get("CompilationStartTime"),
                "CompilationEndTime": item.get("CompilationEndTime"),
                "CompilationTargetDevice": output.get("TargetDevice"),
                "CompilationTargetPlatformOs": (output.get("TargetPlatform") or {}).get("Os"),
                "CompilationTargetPlatformArch": (output.get("TargetPlatform") or {}).get("Arch"),
                "CompilationTargetPlatformAccelerator": (output.get("TargetPlatform") or {}).get("Accelerator"),
                "LastModifiedTime": item["LastModifiedTime"], "CompilationJobStatus": item["CompilationJobStatus"],
            }
            summaries.append(summary)
        response: dict[str, Any] = {"CompilationJobSummaries": summaries}
        if token:
            response["NextToken"] = token
        return shape_output("ListCompilationJobs", response)

    # -- stop / delete -----------------------------------------------------------------------
    def stop(self, name: str) -> None:
        validate_request("StopCompilationJob", {"CompilationJobName": name})
        record = self.store.get(name)
        status = record["CompilationJobStatus"]
        if status in TERMINAL:
            raise ValidationError(f"Compilation job {name} is {status} and cannot be stopped")
        if status != "STOPPING":
            try:
                stopping = self.store.transition(name, "STOPPING", allowed_from=("STARTING", "INPROGRESS"))
            except ConflictError:
                current = self.store.get(name)
                if current["CompilationJobStatus"] in TERMINAL:
                    raise ValidationError(
                        f"Compilation job {name} is {current['CompilationJobStatus']} and cannot be stopped") from None
                stopping = current
            self._events.state_changed(describe_view(stopping))
        self._finish_stop(name)

    def _finish_stop(self, name: str) -> dict[str, Any] | None:
        """Stop the execution and the container, then record STOPPED (exactly once)."""
        record = self.store.get(name)
        if self._containers is not None:
            self._containers.stop(name, f"Compilation job {name} was stopped")
        if record.get("ExecutionArn"):
            try:
                self._sfn.stop_execution(executionArn=record["ExecutionArn"], error="Kiln.Stopped",
                                         cause="StopCompilationJob")
            except ClientError as exc:
                log.info("stop_execution(%s): %s", name, exc.response["Error"]["Code"])
        try:
            stopped = self.store.transition(name, "STOPPED", allowed_from=("STOPPING",),
                                            updates={"CompilationEndTime": time.time()})
        except ConflictError:
            return None  # someone else recorded the terminal state first
        self._events.state_changed(describe_view(stopped))
        return stopped

    def delete(self, name: str) -> None:
        validate_request("DeleteCompilationJob", {"CompilationJobName": name})
        self.store.delete(name)

    # -- workflow-side transitions -----------------------------------------------------------
    def mark_in_progress(self, name: str) -> dict[str, Any]:
        now = time.time()
        record = self.store.transition(name, "INPROGRESS", allowed_from=("STARTING",),
                                       updates={"CompilationStartTime": now}, now=now)
        self._events.state_changed(describe_view(record))
        return record

    def record_success(self, name: str, result: dict[str, Any], inference_image: str = "",
                       tuning_workers: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
        updates: dict[str, Any] = {
            "ModelArtifacts": {"S3ModelArtifacts": result["S3ModelArtifacts"]},
            "ModelDigests": {"ArtifactDigest": result["ArtifactDigest"]},
            "CompilationEndTime": time.time(),
        }
        derived = result.get("DerivedDataInputConfig")
        if derived:
            updates["DerivedInformation"] = {"DerivedDataInputConfig": derived}
        if inference_image:
            updates["InferenceImage"] = inference_image
        if result.get("Tuning") is not None:
            updates["Internal"] = {"Tuning": result["Tuning"], "Timings": result.get("Timings", {})}
        extension: dict[str, Any] = {}
        if result.get("Profile"):
            extension["Profile"] = result["Profile"]
        if result.get("Accuracy"):
            extension["Accuracy"] = result["Accuracy"]
        if result.get("Precision"):
            extension["Precision"] = result["Precision"]  # a bf16 build's deviation from fp32 (ADR 0022)
        usage = self._usage(name, result.get("Timings") or {}, tuning_workers)
        if usage:
            extension["Usage"] = usage
        if extension:
            updates[EXTENSION] = extension
        try:
            record = self.store.transition(name, "COMPLETED", allowed_from=("INPROGRESS",), updates=updates)
        except ConflictError:
            log.info("job %s is no longer INPROGRESS; success not recorded", name)
            return None
        self._events.state_changed(describe_view(record))
        return record

    def _usage(self, name: str, timings: dict[str, Any],
               tuning_workers: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """What the job cost: task-seconds of its compiler containers on its runner, and where they went
        (build includes tuning; the containers' own start and image pull are not counted). A fanned-out job
        adds its tuning workers (ADR 0023): each one's shard, status and task-seconds (none for a worker
        that failed: it reported nothing), and ``TaskSecondsByRunner`` sums build and workers."""
        if "total" not in timings:
            return None
        runner = self.store.get(name).get("Runner", "")
        usage: dict[str, Any] = {"Runner": runner, "TaskSeconds": timings["total"]}
        for stage in ("build", "profile"):
            if stage in timings:
                usage[f"{stage.capitalize()}Seconds"] = timings[stage]
        if tuning_workers:
            workers = [worker_usage(w) for w in tuning_workers]
            usage["TuningWorkers"] = workers
            total = timings["total"] + sum(w.get("TaskSeconds", 0) for w in workers)
            usage["TaskSecondsByRunner"] = {runner: round(total, 3)}
        if runner in {str(r) for r in Runner}:
            spec = Runner(runner).spec
            usage["InstanceFamily"] = spec.instance_family or "fargate"
            usage["Architecture"] = spec.architecture
        return usage

    def record_failure(self, name: str, reason: str) -> dict[str, Any] | None:
        try:
            record = self.store.transition(name, "FAILED", allowed_from=("STARTING", "INPROGRESS"),
                                           updates={"FailureReason": reason[:1024],
                                                    "CompilationEndTime": time.time()})
        except ConflictError:
            current = self.store.get(name)
            if current["CompilationJobStatus"] == "STOPPING":
                return self._finish_stop(name)
            log.info("job %s is %s; failure not recorded", name, current["CompilationJobStatus"])
            return None
        self._events.state_changed(describe_view(record))
        return record

    # -- tags --------------------------------------------------------------------------------
    def _name_from_arn(self, arn: str) -> str:
        match = _ARN.fullmatch(arn)
        if not match:
            raise ValidationError(f"Value '{arn}' at 'resourceArn' failed to satisfy constraint: "
                                  "Kiln tags compilation jobs only (arn:aws:sagemaker:REGION:ACCOUNT:compilation-job/NAME)")
        name = match.group(3)
        try:
            record = self.store.get(name)
        except ResourceNotFound:
            record = None
        if record is None or record["CompilationJobArn"] != arn:
            raise ResourceNotFound(f"Could not find compilation job with ARN {arn}")
        return name

    def add_tags(self, request: dict[str, Any]) -> dict[str, Any]:
        validate_request("AddTags", request)
        rules.check_tags(request["Tags"])
        tags = self.store.add_tags(self._name_from_arn(request["ResourceArn"]), request["Tags"])
        return {"Tags": tags}

    def list_tags(self, request: dict[str, Any]) -> dict[str, Any]:
        validate_request("ListTags", request)
        tags = self.store.get(self._name_from_arn(request["ResourceArn"])).get("Tags", [])
        start = 0
        if request.get("NextToken"):
            try:
                start = int(request["NextToken"])
            except ValueError:
                raise ValidationError("The NextToken is invalid") from None
        limit = int(request.get("MaxResults", 50))
        page = tags[start:start + limit]
        response: dict[str, Any] = {"Tags": page}
        if start + limit < len(tags):
            response["NextToken"] = str(start + limit)
        return response

    def delete_tags(self, request: dict[str, Any]) -> dict[str, Any]:
        validate_request("DeleteTags", request)
        self.store.delete_tags(self._name_from_arn(request["ResourceArn"]), request["TagKeys"])
        return {}


def _principal_arn(caller_arn: str) -> str:
    """The IAM principal behind a caller: an assumed-role session maps to its role."""
    match = re.fullmatch(r"arn:(aws[a-z\-]*):sts::(\d{12}):assumed-role/([^/]+)/.+", caller_arn)
    if match:
        return f"arn:{match.group(1)}:iam::{match.group(2)}:role/{match.group(3)}"
    return caller_arn
