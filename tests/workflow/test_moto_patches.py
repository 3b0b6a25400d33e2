"""The moto workarounds stay needed; when upstream fixes one, this fails and the patch can go."""

from __future__ import annotations

import json

from kiln.local import moto_patches
from kiln.local.stack import render_definition


def test_each_moto_workaround_is_still_needed():
    # GIVEN moto's own code (the originals, whether or not the patches are applied)
    # WHEN each known defect is looked for
    status = moto_patches.upstream_still_needs_patches()
    # THEN every defect is still there (a False means upstream fixed it: delete that patch and this key)
    assert status == {"normalisation": True, "failure_cause": True, "heartbeat_timeout_name": True,
                      "first_answer_wins": True, "dynamodb_atomic_writes": True}


def test_ecs_parameters_are_normalised_once_patched():
    # GIVEN the patch applied
    moto_patches.patch_service_normalisation()
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
        StateTaskServiceEcs,
    )

    service = object.__new__(StateTaskServiceEcs)
    params = {"Cluster": "kiln", "Overrides": {"ContainerOverrides": [{"Name": "compiler", "Environment": [
        {"Name": "A", "Value": "b"}]}]}}
    # WHEN Step Functions-cased RunTask parameters are normalised
    service._normalise_parameters(params, "ecs", "run_task")
    # THEN they are botocore-cased, all the way down
    assert params == {"cluster": "kiln", "overrides": {"containerOverrides": [
        {"name": "compiler", "environment": [{"name": "A", "value": "b"}]}]}}


def test_definition_placeholders_must_all_be_filled():
    # GIVEN the workflow file WHEN rendered with every placeholder THEN it is valid JSON with no placeholder
    names = ["WorkflowFunctionArn", "ClusterArn", "CpuTaskDefinitionArn", "CompilerContainerName"]
    definition = json.loads(render_definition({n: f"arn:{n}" for n in names}))
    assert definition["States"]["CompileOnFargate"]["Parameters"]["Cluster"] == "arn:ClusterArn"
    # AND a missing one is refused
    try:
        render_definition({n: "x" for n in names[1:]})
    except ValueError as exc:
        assert "WorkflowFunctionArn" in str(exc)
    else:
        raise AssertionError("a missing placeholder was not reported")


def test_batch_job_lives_as_long_as_its_local_process(local_stack):
    # GIVEN two jobs submitted to a family's Batch queue (no KILN_JOB: the local runner starts no process)
    from kiln.local import moto_patches

    from tests.workflow.conftest import wait_until

    batch = local_stack.client("batch")
    queue, definition = "kiln-batch-c5", "kiln-compiler-batch-c5"
    ended = batch.submit_job(jobName="ends", jobQueue=queue, jobDefinition=definition)
    killed = batch.submit_job(jobName="killed", jobQueue=queue, jobDefinition=definition)

    def status(job):
        return batch.describe_jobs(jobs=[job["jobId"]])["jobs"][0]["status"]

    # THEN each stays RUNNING (moto alone would try Docker and fail it at once)
    assert wait_until(lambda: status(ended) == "RUNNING" and status(killed) == "RUNNING", timeout=10)
    # WHEN one's process exits and the other is terminated
    moto_patches.batch_container_exited(ended["jobArn"])
    batch.terminate_job(jobId=killed["jobId"], reason="test")
    # THEN the first SUCCEEDED and the second FAILED, as Batch reports them
    assert wait_until(lambda: status(ended) == "SUCCEEDED", timeout=10)
    assert wait_until(lambda: status(killed) == "FAILED", timeout=10)
