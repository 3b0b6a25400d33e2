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
    names = ["WorkflowFunctionArn", "ClusterArn", "CpuTaskDefinitionArn", "CompilerContainerName",
             "GpuJobQueueArn", "GpuJobDefinitionArn"]
    definition = json.loads(render_definition({n: f"arn:{n}" for n in names}))
    assert definition["States"]["CompileOnFargate"]["Parameters"]["Cluster"] == "arn:ClusterArn"
    # AND a missing one is refused
    try:
        render_definition({n: "x" for n in names[1:]})
    except ValueError as exc:
        assert "WorkflowFunctionArn" in str(exc)
    else:
        raise AssertionError("a missing placeholder was not reported")
