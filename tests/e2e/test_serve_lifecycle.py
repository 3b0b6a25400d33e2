"""`kiln serve` shares the host as configured: compiler processes below the API's CPU priority, in
its session (one scheduler autogroup, where nice counts), and a stop that ends them promptly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from tests.compiler.conftest import randomized_light_model
from tests.conftest import tar_gz
from tests.e2e.conftest import start_serve
from tests.workflow.conftest import wait_until

ROLE = "arn:aws:iam::123456789012:role/kiln-compilation-job"


@dataclass(frozen=True)
class ProcStat:
    """What /proc/PID/stat says of a process's grouping and priority."""

    ppid: int
    pgrp: int
    session: int
    nice: int


def proc_stat(pid: int) -> ProcStat:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
    return ProcStat(ppid=int(fields[1]), pgrp=int(fields[2]), session=int(fields[3]), nice=int(fields[16]))


def autogroup(pid: int) -> str | None:
    """The scheduler autogroup a process is in; None where the kernel reports none (no autogroups, or
    a task group of a cgroup, as in many CI containers, where /proc/PID/autogroup reads empty)."""
    try:
        words = Path(f"/proc/{pid}/autogroup").read_text().split()
    except FileNotFoundError:
        return None
    return words[0] if words else None


def compilers_working_in(work_dir: Path) -> list[int]:
    """Compiler processes (any parent) whose environment names ``work_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and b"kiln_compiler" in (entry / "cmdline").read_bytes()
                    and str(work_dir).encode() in (entry / "environ").read_bytes()):
                found.append(int(entry.name))
        except OSError:  # ended while looked at
            continue
    return found


@pytest.mark.slow
def test_compilers_run_below_the_api_and_end_with_a_prompt_stop(tmp_path: Path) -> None:
    # GIVEN kiln serve with compilers in its CPU share, 7 below its priority, and one compiler slot
    work = tmp_path / "work"
    process, api_url, aws_url = start_serve(tmp_path / "serve.log", "--compiler-niceness", "7",
                                            "--compiler-cpu-share", "api", "--max-compilers", "1",
                                            "--work-dir", str(work))
    try:
        keys = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
        api, s3 = boto3.client("sagemaker", endpoint_url=api_url, **keys), boto3.client("s3", endpoint_url=aws_url, **keys)
        # AND two jobs of a model that takes a while to compile (a randomized ResNet-50)
        s3.put_object(Bucket="kiln-local-models", Key="resnet50.tar.gz",
                      Body=tar_gz({"model.onnx": randomized_light_model("resnet50").SerializeToString()}))
        for name in ("lifecycle-first", "lifecycle-second"):
            api.create_compilation_job(
                CompilationJobName=name, RoleArn=ROLE, StoppingCondition={"MaxRuntimeInSeconds": 900},
                InputConfig={"S3Uri": "s3://kiln-local-models/resnet50.tar.gz", "Framework": "ONNX"},
                OutputConfig={"S3OutputLocation": "s3://kiln-local-artifacts/lifecycle", "TargetDevice": "ml_c5"})
        # WHEN the first one's compiler runs
        assert wait_until(lambda: len(compilers_working_in(work)) == 1, timeout=120)
        [compiler] = compilers_working_in(work)
        # THEN it runs 7 below kiln serve's priority, in kiln serve's session (Linux shares the CPU
        # between sessions' autogroups first: in a session of its own, its nice would not count
        # against the API) and in a process group of its own (a stop signals it and its children)
        server, child = proc_stat(process.pid), proc_stat(compiler)
        assert child.ppid == process.pid
        assert child.nice == min(server.nice + 7, 19)
        assert child.session == server.session and child.pgrp == compiler != server.pgrp
        assert autogroup(compiler) == autogroup(process.pid)
        # AND the other job waits for the slot
        assert api.describe_compilation_job(CompilationJobName="lifecycle-second")[
            "CompilationJobStatus"] not in ("COMPLETED", "FAILED", "STOPPED")
        # WHEN kiln serve gets SIGTERM while compiling
        started = time.monotonic()
        process.terminate()
        code = process.wait(timeout=60)
        took = time.monotonic() - started
        # THEN it exits cleanly well inside the 30 s a supervisor (and `make load`) waits before SIGKILL,
        # no compiler of its is left running, and the waiting job's compiler never started
        assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
        assert took < 30, took
        assert not Path(f"/proc/{compiler}").exists()
        assert compilers_working_in(work) == []
        assert "stopped in" in (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
