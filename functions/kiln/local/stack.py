"""The embedded stack: Kiln's AWS resources inside a moto server, with no AWS account.

The same pieces as in AWS: the API and workflow handlers (run in-process), the state machine
file (run by moto's Step Functions interpreter), and the compiler entrypoint (run as a local
process with the environment and command its ECS task or Batch job would get).

The registry hook's EventBridge rules are real rules on the embedded bus. moto's EventBridge
cannot deliver to Lambda targets (``put_events`` raises NotImplementedError for them), so locally
the rules target an SQS queue and :class:`RegistryEventPump` invokes the ``kiln-registry``
Lambda (run in-process) for each delivered event, with Lambda's async retries (3 attempts).

The stack never changes this process's environment: it builds a :class:`kiln.config.KilnSettings`
for its resources and installs a :class:`kiln.wiring.Kiln` over clients bound to its endpoint
(only the compiler processes get an environment: that is the container's contract).
Compiler processes run at most ``max_compilers`` at once (default: the host's CPU count); the
others wait as a full Fargate queue would make them, their pending time counting against
MaxPendingTimeInSeconds. They run below the API's CPU priority (:class:`kiln.local.settings.LocalSettings`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config

from kiln import wiring
from kiln.catalog import Runner
from kiln.config import ENV_PREFIX, KilnSettings
from kiln.inference_images import LOCAL_IMAGES
from kiln.local import moto_patches
from kiln.local.settings import DEFAULT_COMPILER_NICENESS, LocalSettings

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCOUNT = "123456789012"
ASL_PATH = Path(__file__).resolve().parents[3] / "statemachine" / "compilation_job.asl.json"
COMPILER_CONTAINER = "compiler"
COMPILER_COMMAND = ["python", "-m", "kiln_compiler"]
REGISTRY_FUNCTION = "kiln-registry"
REGISTRY_QUEUE = "kiln-registry-events"
# The services the API, the workflow and the compilers call on the embedded endpoint (ADR 0058: the
# compilers' STS call was the first to load its model, during the burst).
MOTO_SERVICES = ("batch", "dynamodb", "ecs", "events", "iam", "lambda", "s3", "sagemaker", "sqs",
                 "stepfunctions", "sts")


def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def render_definition(substitutions: dict[str, str], path: Path = ASL_PATH) -> str:
    """The state machine file with its ``${Name}`` placeholders filled (as CDK does at deploy)."""
    text = path.read_text()
    for key, value in substitutions.items():
        text = text.replace("${" + key + "}", value)
    if "${" in text.replace("$${", ""):
        missing = sorted({part.split("}")[0] for part in text.split("${")[1:]})
        raise ValueError(f"unfilled placeholders in {path.name}: {missing}")
    return text


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    env: dict[str, str]
    stopped: bool = False


class LocalClients:
    """boto3 clients and resources bound to the embedded stack's endpoint (local credentials)."""

    # Every API thread, workflow step and pump may call at once: more pooled connections than
    # botocore's 10, so a busy server does not open (and drop) a new connection per call.
    MAX_POOL_CONNECTIONS = 64

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self._config = botocore.config.Config(max_pool_connections=self.MAX_POOL_CONNECTIONS)
        self._session = boto3.session.Session(aws_access_key_id="local", aws_secret_access_key="local",
                                              region_name=REGION)
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe; their clients are

    def client(self, service_name: str) -> Any:
        with self._lock:
            return self._session.client(service_name, endpoint_url=self.endpoint_url, config=self._config)

    def resource(self, service_name: str) -> Any:
        with self._lock:
            return self._session.resource(service_name, endpoint_url=self.endpoint_url, config=self._config)


@dataclass
class LocalContainerRunner:
    """Runs compiler containers as local processes, at most ``max_running`` at once (the rest wait
    in ``queued``, as tasks wait for Fargate capacity); reports their exit like ECS/Batch events.

    Compiler processes run ``niceness`` below this process's CPU priority (in AWS they have capacity
    of their own; on one host they would otherwise starve the API: p99 12.7 s under 20 clients), in
    a process group of their own (``stop`` signals the group: the compiler and its tuning/measuring
    children), in a session of their own unless ``in_own_session`` is False (then in this process's,
    where their nice counts against the API's under scheduler autogroups: ADR 0029). ``close`` ends
    them all and starts no more."""

    endpoint_url: str
    work_root: Path
    on_exit: Any = None  # callable(env, exit_code, reason)
    processes: dict[str, _Process] = field(default_factory=dict)
    log_dir: Path | None = None
    max_running: int = field(default_factory=lambda: host_cpus())
    # Environment every compiler process gets on top of its task's (e.g. the tuning database).
    extra_env: dict[str, str] = field(default_factory=dict)
    queued: deque[tuple[str, dict[str, str]]] = field(default_factory=deque)
    peak_running: int = 0  # the most compiler processes seen running at once
    # While True, tasks stay pending (no capacity at all): used to exercise MaxPendingTimeInSeconds.
    hold: bool = False
    held: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # TEST-ONLY: job name -> KILN_FAULT for that job's compiler process (kiln_compiler.faults).
    faults: dict[str, str] = field(default_factory=dict)
    niceness: int = DEFAULT_COMPILER_NICENESS
    in_own_session: bool = True
    closed: bool = False  # set by close(): no compiler starts any more, exits are not reported
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def start(self, task_id: str, env: dict[str, str]) -> None:
        if "KILN_JOB" not in env or self.closed:
            return
        if self.hold:
            self.held.append((task_id, env))
            return
        with self._lock:
            self.queued.append((task_id, env))
        self._start_queued()

    def set_capacity(self, max_running: int) -> None:
        """Change how many compiler processes may run at once; queued tasks start if slots opened."""
        with self._lock:
            self.max_running = max_running
        self._start_queued()

    def running(self) -> int:
        """Compiler processes running now."""
        with self._lock:
            return sum(1 for p in self.processes.values() if p.popen.poll() is None)

    def _start_queued(self) -> None:
        with self._lock:
            while self.queued and not self.closed and self.running() < self.max_running:
                self._launch(*self.queued.popleft())

    def _launch(self, task_id: str, env: dict[str, str]) -> None:
        job_name = json.loads(env["KILN_JOB"]).get("CompilationJobName", "job")
        work = self.work_root / job_name
        work.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **self.extra_env, **env, "AWS_ENDPOINT_URL": self.endpoint_url,
                    "KILN_WORK_DIR": str(work), "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                    "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "PYTHONUNBUFFERED": "1",
                    # a local process runs on this host, whatever the job's runner: measure what it can run
                    "KILN_PROFILE": "host", "KILN_RUNNER": "local"}
        full_env.pop("MOTO_PORT", None)
        full_env.pop("KILN_FAULT", None)  # only a test's per-job fault, never an inherited one
        if job_name in self.faults:
            full_env["KILN_FAULT"] = self.faults[job_name]
        command = [sys.executable, *COMPILER_COMMAND[1:]]
        log_path = (self.log_dir or work) / f"{job_name}.log"
        # Linux's scheduler autogroups (on by default in most distributions' kernels) share the CPU
        # between sessions first and apply nice only within one: a compiler in a session of its own
        # gets a share beside the API's whatever its nice; in this one, it yields to the API (ADR 0029).
        grouping: dict[str, Any] = {"start_new_session": True} if self.in_own_session else {"process_group": 0}
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                     cwd=work, **grouping)
        # Its threads and children, started later, inherit it (not permitted / no such call: skipped).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, popen.pid, os.getpriority(os.PRIO_PROCESS, 0) + self.niceness)
        process = _Process(popen, env)
        self.processes[task_id] = process
        self.peak_running = max(self.peak_running, self.running())
        threading.Thread(target=self._wait, args=(task_id, process), daemon=True,
                         name=f"kiln-container-{job_name}").start()

    def _wait(self, task_id: str, process: _Process) -> None:
        code = process.popen.wait()
        if self.closed:  # the stack is stopping: nothing left to report to
            return
        if ":batch:" in task_id:  # a Batch job (its ARN): the moto job ends with its process
            moto_patches.batch_container_exited(task_id)
        self._start_queued()  # a slot is free
        reason = "Task stopped by user" if process.stopped else "Essential container in task exited"
        if self.on_exit is not None:
            try:
                self.on_exit(process.env, None if process.stopped else code, reason)
            except Exception:
                log.exception("container exit hook failed")

    def stop(self, task_id: str) -> None:
        suffix = task_id.split("/")[-1]
        with self._lock:  # a task still waiting for a slot never starts
            kept = [(key, env) for key, env in self.queued if not key.endswith(suffix)]
            self.queued = deque(kept)
        for key, process in list(self.processes.items()):
            if key.endswith(suffix) and process.popen.poll() is None:
                process.stopped = True
                try:
                    os.killpg(process.popen.pid, signal.SIGTERM)
                    process.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self, grace: float = 5.0) -> None:
        """End every compiler process (SIGTERM to each group at once, SIGKILL to what is left after
        ``grace`` s) and start none again, queued or new; their exits are not reported (the stack
        they would report to is stopping)."""
        with self._lock:
            self.closed = True
            self.queued.clear()
            self.held.clear()
            running = [p for p in self.processes.values() if p.popen.poll() is None]
        for process in running:
            process.stopped = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            # the group's members that outlived the grace, or their leader (none may outlive the stack)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait()


class RegistryEventPump:
    """Local stand-in for EventBridge -> Lambda delivery: polls the rules' SQS queue and invokes the
    registry Lambda per event (concurrently, as Lambda would), retrying a failed event twice."""

    def __init__(self, sqs: Any, lam: Any, queue_url: str, function: str, workers: int = 4,
                 max_attempts: int = 3) -> None:
        self._sqs, self._lam, self._queue_url, self._function = sqs, lam, queue_url, function
        self._max_attempts = max_attempts
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-registry")
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._gate = threading.Lock()  # held while receiving and handing off
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="kiln-registry-pump")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def pause(self, timeout: float = 60) -> None:
        """Hold events in the queue (tests that drive the hook by hand); ``resume`` delivers them.
        Returns once no delivery is in flight."""
        self._running.clear()
        with self._gate:
            pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if not self._in_flight:
                    return
            time.sleep(0.05)

    def resume(self) -> None:
        self._running.set()

    def idle(self) -> bool:
        """No event in flight and none waiting (visible or being retried) in the queue."""
        with self._lock:
            if self._in_flight:
                return False
        attrs = self._sqs.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return not int(attrs["ApproximateNumberOfMessages"]) and not int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._running.wait(timeout=0.5):
                continue
            with self._gate:
                if self._running.is_set():
                    self._receive()

    def _receive(self) -> None:
        try:
            messages = self._sqs.receive_message(QueueUrl=self._queue_url, MaxNumberOfMessages=10,
                                                 WaitTimeSeconds=1, VisibilityTimeout=60,
                                                 AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
        except Exception:
            if not self._stop.is_set():
                log.exception("registry event pump: receive failed")
            time.sleep(0.5)
            return
        for message in messages:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._deliver, message)

    def _deliver(self, message: dict[str, Any]) -> None:
        try:
            response = self._lam.invoke(FunctionName=self._function, Payload=message["Body"].encode())
            attempts = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            if response.get("FunctionError") and attempts < self._max_attempts:
                log.info("registry event failed (attempt %d): %s; retrying", attempts, response["Payload"].read())
                self._sqs.change_message_visibility(QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"],
                                                    VisibilityTimeout=attempts)
            else:
                if response.get("FunctionError"):
                    log.warning("registry event dropped after %d attempts: %s", attempts, response["Payload"].read())
                self._sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"])
        except Exception:
            if not self._stop.is_set():
                log.exception("registry event pump: delivery failed")
        finally:
            with self._lock:
                self._in_flight -= 1


class EmbeddedStack:
    """A moto server holding Kiln's resources, wired to the in-process handlers."""

    def __init__(self, host: str = "127.0.0.1", aws_port: int | None = None, work_dir: Path | None = None,
                 max_active_jobs: int = 20, max_compilers: int | None = None,
                 local: LocalSettings | None = None) -> None:
        """``local``: how compilers share this host (``max_compilers`` is short for its field)."""
        self.host = host
        self.aws_port = aws_port or free_port(host)
        self.endpoint_url = f"http://{host}:{self.aws_port}"
        self._own_work = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="kiln-local-"))
        self.max_active_jobs = max_active_jobs
        if max_compilers is not None and max_compilers < 1:
            raise ValueError(f"max_compilers must be at least 1, got {max_compilers}")
        self.local = (local or LocalSettings()).model_copy(
            update={} if max_compilers is None else {"max_compilers": max_compilers})
        self.outputs: dict[str, str] = {}
        self._server: Any = None
        self.runner = LocalContainerRunner(self.endpoint_url, self.work_dir / "containers",
                                           extra_env={"KILN_TUNING_DB": str(self.work_dir / "tuning-db")},
                                           niceness=self.local.compiler_niceness,
                                           in_own_session=self.local.compiler_cpu_share == "own")
        if self.local.max_compilers is not None:
            self.runner.max_running = self.local.max_compilers
        self.clients = LocalClients(self.endpoint_url)
        self._kiln: wiring.Kiln | None = None
        self._replaced: wiring.Kiln | None = None
        self.registry_pump: RegistryEventPump | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        from moto.core.config import default_user_config

        from kiln.local.keepalive import MotoServer

        default_user_config.setdefault("stepfunctions", {})["execute_state_machine"] = True
        moto_patches.patch_server_port(self.aws_port)
        moto_patches.patch_service_normalisation()
        moto_patches.patch_lambda_in_process()
        moto_patches.patch_send_task_failure_cause()
        moto_patches.patch_heartbeat_timeout_name()
        moto_patches.patch_first_token_answer_wins()
        moto_patches.patch_dynamodb_atomic_writes()
        moto_patches.patch_dynamodb_transaction_snapshots()
        moto_patches.patch_container_runner(self.runner.start, self.runner.stop)
        moto_patches.patch_update_model_package_keeps_fields()
        moto_patches.patch_server_module_list()
        moto_patches.patch_response_method_names()
        moto_patches.patch_dynamodb_fast_reads()
        moto_patches.patch_dynamodb_projection()
        moto_patches.patch_dynamodb_items_untracked()
        moto_patches.patch_step_functions_clients_reused()
        moto_patches.patch_step_functions_parse_once()
        moto_patches.patch_dynamodb_query_copies()
        moto_patches.patch_step_functions_json_paths_parsed_once()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # moto's own ThreadedMotoServer closes every connection after one call (ADR 0037)
        self._server = MotoServer(self.host, self.aws_port).start()
        self._create_resources()
        self._warm()
        self.runner.on_exit = self._container_exited
        self.registry_pump = RegistryEventPump(self.client("sqs"), self.client("lambda"),
                                               self.outputs["RegistryQueueUrl"], REGISTRY_FUNCTION)
        self.registry_pump.start()
        return self

    def stop(self) -> None:
        """End the compiler processes (jobs not yet terminal end with the stack: its state is in
        memory), the registry pump and the moto server."""
        self.runner.close(self.local.stop_grace_seconds)
        if self.registry_pump is not None:
            self.registry_pump.stop()
            self.registry_pump = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._kiln is not None:
            wiring.install(self._replaced)
            self._kiln = self._replaced = None
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kiln(self) -> wiring.Kiln:
        """The composition serving now (service, workflow steps, registry hook): the stack's own,
        or the ``reconfigured`` one inside that block."""
        self._kiln_required()
        return wiring.current()

    @property
    def settings(self) -> KilnSettings:
        return self.kiln.settings

    @contextmanager
    def reconfigured(self, **changes: Any) -> Iterator[wiring.Kiln]:
        """Serve with some settings changed (``KilnSettings`` field names) inside the block, then
        restore. Workflows keep the stack's own steps, as running executions would."""
        before = wiring.current()
        values = {**before.settings.model_dump(), **changes}
        changed = wiring.Kiln(KilnSettings(**values), self.clients, workflow_steps=self._kiln_required().workflow_steps)
        wiring.install(changed)
        try:
            yield changed
        finally:
            wiring.install(before)

    def _kiln_required(self) -> wiring.Kiln:
        if self._kiln is None:
            raise RuntimeError("the embedded stack is not started")
        return self._kiln

    def client(self, service: str) -> Any:
        return self.clients.client(service)

    # -- resources ---------------------------------------------------------------------------
    def _create_resources(self) -> None:
        import urllib.request

        from kiln.store import table_definition

        # moto keeps its backends per process: a previous stack's resources would collide, so an
        # embedded stack starts from empty backends (one live stack per process).
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST"))

        iam = self.client("iam")
        trust = json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"Service": ["lambda.amazonaws.com", "states.amazonaws.com",
                                                          "ecs-tasks.amazonaws.com"]},
             "Action": "sts:AssumeRole"}]})
        role_arn = iam.create_role(RoleName="kiln-local", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        job_role = iam.create_role(RoleName="kiln-compilation-job", AssumeRolePolicyDocument=trust)["Role"]["Arn"]

        table = "kiln-jobs"
        self.client("dynamodb").create_table(**table_definition(table))

        ec2 = self.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="kiln-compiler", Description="kiln compiler",
                                          VpcId=vpc)["GroupId"]

        ecs = self.client("ecs")
        cluster = ecs.create_cluster(clusterName="kiln")["cluster"]["clusterArn"]
        task_def = ecs.register_task_definition(
            family="kiln-compiler", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="2048", memory="8192", executionRoleArn=role_arn, taskRoleArn=role_arn,
            containerDefinitions=[{"name": COMPILER_CONTAINER, "image": "kiln-compiler:local",
                                   "command": COMPILER_COMMAND, "essential": True,
                                   "cpu": 2048, "memory": 8192}],
        )["taskDefinition"]["taskDefinitionArn"]

        batch = self.client("batch")
        env_arn = batch.create_compute_environment(
            computeEnvironmentName="kiln-local", type="UNMANAGED", state="ENABLED",
            serviceRole=role_arn)["computeEnvironmentArn"]
        # One queue and job definition per Batch runner of the catalog, as CDK creates per enabled family;
        # the local runner runs each as a local process on this host.
        placements = {str(runner): self._batch_runner(batch, env_arn, str(runner)) for runner in Runner
                      if runner.spec.platform == "batch"}
        queue = {"jobQueueArn": placements[str(Runner.BATCH_GPU)]["JobQueue"]}

        lam = self.client("lambda")
        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as archive:
            archive.writestr("README.txt", "Kiln runs this function's handler in-process.")
        function = lam.create_function(FunctionName="kiln-workflow", Runtime="python3.11", Role=role_arn,
                                       Handler="kiln.handlers.workflow.handler",
                                       Code={"ZipFile": code.getvalue()}, Timeout=60)["FunctionArn"]

        definition = render_definition({
            "WorkflowFunctionArn": function, "ClusterArn": cluster, "CpuTaskDefinitionArn": task_def,
            "CompilerContainerName": COMPILER_CONTAINER,
        })
        machine = self.client("stepfunctions").create_state_machine(
            name="kiln-compilation-job", definition=definition, roleArn=role_arn)["stateMachineArn"]

        for bucket in ("kiln-local-models", "kiln-local-artifacts"):
            self.client("s3").create_bucket(Bucket=bucket)

        registry = self._create_registry_hook(lam, role_arn, code.getvalue())

        self.outputs = {"JobRoleArn": job_role, "StateMachineArn": machine, "TableName": table,
                        "ClusterArn": cluster, "SubnetId": subnet, "SecurityGroupId": group,
                        "GpuJobQueueArn": queue["jobQueueArn"], "ModelBucket": "kiln-local-models",
                        "ArtifactBucket": "kiln-local-artifacts", **registry}
        # Registry hook and serving-image defaults; a caller's own KILN_* variables win (read, never written).
        registry_defaults: dict[str, Any] = {name: value for name, value in {
            "registry_output_s3": "s3://kiln-local-artifacts/registry", "registry_role_arn": job_role,
            "inference_images": dict(LOCAL_IMAGES)}.items()
            if not os.environ.get(ENV_PREFIX + name.upper())}
        settings = KilnSettings(
            region=REGION, account_id=ACCOUNT, table_name=table, state_machine_arn=machine,
            pagination_key=secrets.token_urlsafe(32), ecs_cluster=cluster, compiler_task_family="kiln-compiler",
            gpu_job_queue=queue["jobQueueArn"], subnets=subnet, security_groups=group,
            max_active_jobs=self.max_active_jobs, emit_metrics=False,
            enabled_runners=",".join(str(runner) for runner in Runner), runner_placements=placements,
            **registry_defaults)
        self._kiln = wiring.Kiln(settings, self.clients)
        self._replaced = wiring.install(self._kiln)

    def _warm(self) -> None:
        """Build now what the workflow steps of the first jobs would build on first use: when 20
        jobs are accepted at once, their executions otherwise build it together, under this process's
        interpreter lock, while the API's calls to moto wait (ADR 0050)."""
        from kiln import contract

        self._kiln_required().workflow_steps  # noqa: B018  (the service, its store and clients)
        contract.service_model()
        moto_patches.warm_step_functions(REGION)
        moto_patches.warm_service_models(MOTO_SERVICES)

    @staticmethod
    def _batch_runner(batch: Any, environment_arn: str, runner: str) -> dict[str, str]:
        """A Batch runner's queue and job definition (what ``kiln.service`` puts in the execution's Placement)."""
        queue = batch.create_job_queue(jobQueueName=f"kiln-{runner}", state="ENABLED", priority=1,
                                       computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}])
        definition = batch.register_job_definition(
            jobDefinitionName=f"kiln-compiler-{runner}", type="container",
            containerProperties={"image": f"kiln-compiler-{runner}:local", "command": COMPILER_COMMAND,
                                 "environment": [{"name": "KILN_RUNNER", "value": runner}],
                                 "resourceRequirements": [{"type": "VCPU", "value": "4"},
                                                          {"type": "MEMORY", "value": "16384"}]})
        return {"JobQueue": queue["jobQueueArn"], "JobDefinition": definition["jobDefinitionArn"]}

    def _create_registry_hook(self, lam: Any, role_arn: str, code: bytes) -> dict[str, str]:
        """The registry Lambda and its two rules on the default bus (SQS-delivered; see the module doc)."""
        from kiln.registry import JOB_COMPLETED_EVENT_PATTERN, MODEL_PACKAGE_EVENT_PATTERN

        function = lam.create_function(FunctionName=REGISTRY_FUNCTION, Runtime="python3.11", Role=role_arn,
                                       Handler="kiln.handlers.registry.handler", Code={"ZipFile": code},
                                       Timeout=300)["FunctionArn"]
        sqs = self.client("sqs")
        queue_url = sqs.create_queue(QueueName=REGISTRY_QUEUE)["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events = self.client("events")
        for rule, pattern in (("kiln-registry-model-package", MODEL_PACKAGE_EVENT_PATTERN),
                              ("kiln-registry-job-completed", JOB_COMPLETED_EVENT_PATTERN)):
            events.put_rule(Name=rule, EventPattern=json.dumps(pattern), State="ENABLED")
            events.put_targets(Rule=rule, Targets=[{"Id": "registry", "Arn": queue_arn}])
        return {"RegistryFunctionArn": function, "RegistryQueueUrl": queue_url}

    def wait_for_registry(self, timeout: float = 60, poll: float = 0.2) -> bool:
        """Wait until every event delivered to the registry hook has been handled (tests, CLI)."""
        deadline = time.time() + timeout
        settled = 0
        while time.time() < deadline:
            settled = settled + 1 if self.registry_pump is not None and self.registry_pump.idle() else 0
            if settled >= 3:  # idle on consecutive polls: nothing was in between receive and hand-off
                return True
            time.sleep(poll)
        return False

    def _container_exited(self, env: dict[str, str], exit_code: int | None, reason: str) -> None:
        """What the ECS Task State Change rule does in AWS: hand the stop to the workflow handler."""
        from kiln.handlers.workflow import container_stopped

        event = {"source": "aws.ecs", "detail-type": "ECS Task State Change",
                 "detail": {"lastStatus": "STOPPED", "stoppedReason": reason,
                            "containers": [{"name": COMPILER_CONTAINER, "exitCode": exit_code}],
                            "overrides": {"containerOverrides": [
                                {"name": COMPILER_CONTAINER,
                                 "environment": [{"name": k, "value": v} for k, v in env.items()]}]}}}
        container_stopped(event, moto_patches._Context())  # type: ignore[arg-type]

    def wait_for(self, job_name: str, timeout: float = 600, poll: float = 0.5) -> dict[str, Any]:
        """Poll DescribeCompilationJob until the job is terminal (for tests and the CLI)."""
        deadline = time.time() + timeout
        while True:
            job = self.kiln.service.describe(job_name)
            if job["CompilationJobStatus"] in ("COMPLETED", "FAILED", "STOPPED") or time.time() > deadline:
                return job
            time.sleep(poll)
