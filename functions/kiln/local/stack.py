"""The embedded stack: Kiln's AWS resources inside a moto server, with no AWS account.

The same pieces as in AWS: the API and workflow handlers (run in-process), the state machine
file (run by moto's Step Functions interpreter), and the compiler entrypoint (run as a local
process with the environment and command its ECS task or Batch job would get).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from kiln.local import moto_patches

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCOUNT = "123456789012"
ASL_PATH = Path(__file__).resolve().parents[3] / "statemachine" / "compilation_job.asl.json"
COMPILER_CONTAINER = "compiler"
COMPILER_COMMAND = ["python", "-m", "kiln_compiler"]


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


@dataclass
class LocalContainerRunner:
    """Runs compiler containers as local processes; reports their exit like ECS/Batch events."""

    endpoint_url: str
    work_root: Path
    on_exit: Any = None  # callable(env, exit_code, reason)
    processes: dict[str, _Process] = field(default_factory=dict)
    log_dir: Path | None = None

    def start(self, task_id: str, env: dict[str, str]) -> None:
        if "KILN_JOB" not in env:
            return
        job_name = json.loads(env["KILN_JOB"]).get("CompilationJobName", "job")
        work = self.work_root / job_name
        work.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **env, "AWS_ENDPOINT_URL": self.endpoint_url, "KILN_WORK_DIR": str(work),
                    "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_REGION": REGION,
                    "AWS_DEFAULT_REGION": REGION, "PYTHONUNBUFFERED": "1"}
        full_env.pop("MOTO_PORT", None)
        command = [sys.executable, *COMPILER_COMMAND[1:]]
        log_path = (self.log_dir or work) / f"{job_name}.log"
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                     cwd=work, start_new_session=True)
        process = _Process(popen, env)
        self.processes[task_id] = process
        threading.Thread(target=self._wait, args=(task_id, process), daemon=True,
                         name=f"kiln-container-{job_name}").start()

    def _wait(self, task_id: str, process: _Process) -> None:
        code = process.popen.wait()
        reason = "Task stopped by user" if process.stopped else "Essential container in task exited"
        if self.on_exit is not None:
            try:
                self.on_exit(process.env, None if process.stopped else code, reason)
            except Exception:
                log.exception("container exit hook failed")

    def stop(self, task_id: str) -> None:
        for key, process in list(self.processes.items()):
            if key.endswith(task_id.split("/")[-1]) and process.popen.poll() is None:
                process.stopped = True
                try:
                    os.killpg(process.popen.pid, signal.SIGTERM)
                    process.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        for task_id in list(self.processes):
            self.stop(task_id)


class EmbeddedStack:
    """A moto server holding Kiln's resources, wired to the in-process handlers."""

    def __init__(self, host: str = "127.0.0.1", aws_port: int | None = None, work_dir: Path | None = None,
                 max_active_jobs: int = 20) -> None:
        self.host = host
        self.aws_port = aws_port or free_port(host)
        self.endpoint_url = f"http://{host}:{self.aws_port}"
        self._own_work = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="kiln-local-"))
        self.max_active_jobs = max_active_jobs
        self.outputs: dict[str, str] = {}
        self._server: Any = None
        self.runner = LocalContainerRunner(self.endpoint_url, self.work_dir / "containers")
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        from moto.core.config import default_user_config
        from moto.server import ThreadedMotoServer

        default_user_config.setdefault("stepfunctions", {})["execute_state_machine"] = True
        self._set_env({"MOTO_PORT": str(self.aws_port), "AWS_ENDPOINT_URL": self.endpoint_url,
                       "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                       "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                       "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "Kiln"})
        moto_patches.patch_service_normalisation()
        moto_patches.patch_lambda_in_process()
        moto_patches.patch_send_task_failure_cause()
        moto_patches.patch_container_runner(self.runner.start, self.runner.stop)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.aws_port, verbose=False)
        self._server.start()
        self._create_resources()
        self.runner.on_exit = self._container_exited
        return self

    def stop(self) -> None:
        self.runner.stop_all()
        if self._server is not None:
            self._server.stop()
            self._server = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._reset_caches()
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    @staticmethod
    def _reset_caches() -> None:
        from kiln.config import settings
        from kiln.handlers import workflow
        from kiln.wiring import default_service

        settings.cache_clear()
        default_service.cache_clear()
        workflow._steps.cache_clear()

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint_url,
                            aws_access_key_id="local", aws_secret_access_key="local")

    # -- resources ---------------------------------------------------------------------------
    def _create_resources(self) -> None:
        from kiln.store import table_definition

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
            computeEnvironmentName="kiln-gpu", type="UNMANAGED", state="ENABLED",
            serviceRole=role_arn)["computeEnvironmentArn"]
        queue = batch.create_job_queue(jobQueueName="kiln-gpu", state="ENABLED", priority=1,
                                       computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env_arn}])
        job_def = batch.register_job_definition(
            jobDefinitionName="kiln-compiler-gpu", type="container",
            containerProperties={"image": "kiln-compiler-gpu:local", "command": COMPILER_COMMAND,
                                 "resourceRequirements": [{"type": "VCPU", "value": "4"},
                                                          {"type": "MEMORY", "value": "16384"}]})

        lam = self.client("lambda")
        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as archive:
            archive.writestr("README.txt", "Kiln runs this function's handler in-process.")
        function = lam.create_function(FunctionName="kiln-workflow", Runtime="python3.11", Role=role_arn,
                                       Handler="kiln.handlers.workflow.handler",
                                       Code={"ZipFile": code.getvalue()}, Timeout=60)["FunctionArn"]

        definition = render_definition({
            "WorkflowFunctionArn": function, "ClusterArn": cluster, "CpuTaskDefinitionArn": task_def,
            "CompilerContainerName": COMPILER_CONTAINER, "GpuJobQueueArn": queue["jobQueueArn"],
            "GpuJobDefinitionArn": job_def["jobDefinitionArn"],
        })
        machine = self.client("stepfunctions").create_state_machine(
            name="kiln-compilation-job", definition=definition, roleArn=role_arn)["stateMachineArn"]

        for bucket in ("kiln-local-models", "kiln-local-artifacts"):
            self.client("s3").create_bucket(Bucket=bucket)

        self.outputs = {"JobRoleArn": job_role, "StateMachineArn": machine, "TableName": table,
                        "ClusterArn": cluster, "SubnetId": subnet, "SecurityGroupId": group,
                        "GpuJobQueueArn": queue["jobQueueArn"], "ModelBucket": "kiln-local-models",
                        "ArtifactBucket": "kiln-local-artifacts"}
        self._set_env({
            "KILN_TABLE_NAME": table, "KILN_STATE_MACHINE_ARN": machine, "KILN_ACCOUNT_ID": ACCOUNT,
            "KILN_ECS_CLUSTER": cluster, "KILN_COMPILER_TASK_FAMILY": "kiln-compiler",
            "KILN_GPU_JOB_QUEUE": queue["jobQueueArn"], "KILN_SUBNETS": subnet, "KILN_SECURITY_GROUPS": group,
            "KILN_MAX_ACTIVE_JOBS": str(self.max_active_jobs),
            "KILN_TUNING_DB": str(self.work_dir / "tuning-db"),
        })
        self._reset_caches()

    def _container_exited(self, env: dict[str, str], exit_code: int | None, reason: str) -> None:
        """What the ECS Task State Change rule does in AWS: hand the stop to the workflow handler."""
        from kiln.handlers.workflow import container_stopped

        event = {"source": "aws.ecs", "detail-type": "ECS Task State Change",
                 "detail": {"lastStatus": "STOPPED", "stoppedReason": reason,
                            "containers": [{"name": COMPILER_CONTAINER, "exitCode": exit_code}],
                            "overrides": {"containerOverrides": [
                                {"name": COMPILER_CONTAINER,
                                 "environment": [{"name": k, "value": v} for k, v in env.items()]}]}}}
        container_stopped(event, moto_patches._Context())

    def wait_for(self, job_name: str, timeout: float = 600, poll: float = 0.5) -> dict[str, Any]:
        """Poll DescribeCompilationJob until the job is terminal (for tests and the CLI)."""
        from kiln.wiring import default_service

        deadline = time.time() + timeout
        while True:
            job = default_service().describe(job_name)
            if job["CompilationJobStatus"] in ("COMPLETED", "FAILED", "STOPPED") or time.time() > deadline:
                return job
            time.sleep(poll)
