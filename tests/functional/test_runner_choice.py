"""Which runner a job gets: the catalog's, refused when this deployment lacks it, Graviton falling back."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError


def _execution_input(local_stack: Any, name: str) -> dict[str, Any]:
    arn = local_stack.kiln.service.store.get(name)["ExecutionArn"]
    return json.loads(local_stack.client("stepfunctions").describe_execution(executionArn=arn)["input"])


def test_cloud_target_is_placed_on_its_family_queue(local_stack: Any, sagemaker: Any,
                                                    job_request: Callable[..., Any],
                                                    unique: Callable[[str], str]) -> None:
    # GIVEN a job for ml_c5 (its instance family matters for tuning and timing)
    name = unique("c5")
    request = job_request(name)
    request["OutputConfig"]["TargetDevice"] = "ml_c5"
    # WHEN it is created
    sagemaker.create_compilation_job(**request)
    # THEN its execution submits to the c5 family's Batch queue and job definition
    started = _execution_input(local_stack, name)
    assert started["Runner"] == "batch-c5"
    assert started["Placement"]["Platform"] == "batch"
    assert started["Placement"]["JobQueue"].endswith("job-queue/kiln-batch-c5")
    assert "job-definition/kiln-compiler-batch-c5" in started["Placement"]["JobDefinition"]
    sagemaker.stop_compilation_job(CompilationJobName=name)


def test_graviton_falls_back_to_the_generic_runner_and_x86_families_are_refused(
        local_stack: Any, sagemaker: Any, job_request: Callable[..., Any], unique: Callable[[str], str],
        reconfigured: Callable[..., Any]) -> None:
    # GIVEN a deployment with the generic runner and the c4 family only (no Graviton, no c5 environments)
    with reconfigured(enabled_runners="fargate,batch-c4"):
        # WHEN a Graviton2 job and an ml_c5 job are created
        graviton = unique("c6g")
        request = job_request(graviton)
        request["OutputConfig"]["TargetDevice"] = "ml_c6g"
        sagemaker.create_compilation_job(**request)
        c5 = job_request(unique("c5"))
        c5["OutputConfig"]["TargetDevice"] = "ml_c5"
        with pytest.raises(ClientError) as refused:
            sagemaker.create_compilation_job(**c5)
        # THEN Graviton is cross-built on the generic Fargate runner (as before families existed)
        started = _execution_input(local_stack, graviton)
        assert started["Runner"] == "fargate" and started["Placement"] == {"Platform": "ecs"}
        sagemaker.stop_compilation_job(CompilationJobName=graviton)
    # AND ml_c5 is refused at create, naming the runner it needs
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "'batch-c5' compiler runner" in refused.value.response["Error"]["Message"]


def test_platform_target_with_graviton3_cpu_runs_on_the_c7g_family(local_stack: Any, sagemaker: Any,
                                                                   job_request: Callable[..., Any],
                                                                   unique: Callable[[str], str]) -> None:
    # GIVEN TargetPlatform LINUX/ARM64 with Graviton3's mcpu (how a c7g job is asked for)
    name = unique("c7g")
    request = job_request(name)
    request["OutputConfig"] = {**request["OutputConfig"], "TargetPlatform": {"Os": "LINUX", "Arch": "ARM64"},
                               "CompilerOptions": '{"mcpu": "neoverse-v1"}'}
    del request["OutputConfig"]["TargetDevice"]
    # WHEN it is created  THEN it is placed on the c7g family
    sagemaker.create_compilation_job(**request)
    assert _execution_input(local_stack, name)["Runner"] == "batch-c7g"
    sagemaker.stop_compilation_job(CompilationJobName=name)
