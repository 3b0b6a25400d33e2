"""The state machine: the statemachine/ file inlined, logged, traced, and granted each integration it uses."""

from __future__ import annotations

import json
import re
from typing import Any

from kiln.local.stack import ASL_PATH, render_definition
from kiln_infra.runners import CONTAINER_NAME
from kiln_infra.workflow import MANAGED_RULES

from .conftest import Synthesized, as_list, resolve, statements


def _machine(synth: Synthesized) -> dict[str, Any]:
    return synth.one("AWS::StepFunctions::StateMachine")[1]["Properties"]


def _policy_of_role(synth: Synthesized, role_id: str) -> list[dict[str, Any]]:
    found = []
    for policy in synth.of_type("AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            found.extend(statements(policy["Properties"]["PolicyDocument"]))
    return found


def _allows(stmts: list[dict[str, Any]], action: str, resource: str) -> bool:
    return any(s["Effect"] == "Allow" and action in as_list(s["Action"])
               and resource in [resolve(r) for r in as_list(s["Resource"])] for s in stmts)


def test_inline_definition_is_the_statemachine_file_with_the_deployed_arns(synth: Synthesized) -> None:
    # GIVEN the synthesized state machine: its inline definition and its substitutions
    props = _machine(synth)
    definition = props["DefinitionString"]
    substitutions = {k: resolve(v) for k, v in props["DefinitionSubstitutions"].items()}
    # THEN the definition is the file itself (inline, not an S3 asset) and every placeholder is substituted
    assert isinstance(definition, str) and "DefinitionS3Location" not in props
    assert json.loads(definition) == json.loads(ASL_PATH.read_text())
    placeholders = set(re.findall(r"\$\{(\w+)\}", ASL_PATH.read_text()))
    assert set(substitutions) == placeholders
    # AND filling it as CloudFormation does gives what the local stack renders from the same file
    deployed = definition
    for key, value in substitutions.items():
        deployed = deployed.replace("${" + key + "}", value)
    assert json.loads(deployed) == json.loads(render_definition(substitutions))


def test_substitutions_name_the_deployed_resources(synth: Synthesized) -> None:
    # GIVEN the substitutions and the resources they should point at
    subs = _machine(synth)["DefinitionSubstitutions"]
    steps = next(k for k in synth.of_type("AWS::Lambda::Function") if k.startswith("WorkflowFunctionsSteps"))
    cluster, _ = synth.one("AWS::ECS::Cluster")
    task, task_def = synth.one("AWS::ECS::TaskDefinition")
    # THEN each one is the ARN of that resource (Batch queues travel in the execution's Placement instead)
    assert subs["WorkflowFunctionArn"] == {"Fn::GetAtt": [steps, "Arn"]}
    assert subs["ClusterArn"] == {"Fn::GetAtt": [cluster, "Arn"]}
    assert subs["CpuTaskDefinitionArn"] == {"Ref": task}
    # AND the container name is the task definition's (only) container
    (container,) = task_def["Properties"]["ContainerDefinitions"]
    assert subs["CompilerContainerName"] == container["Name"] == CONTAINER_NAME


def test_logging_all_without_execution_data_and_tracing(synth: Synthesized) -> None:
    # GIVEN the state machine's logging and tracing
    props = _machine(synth)
    logging = props["LoggingConfiguration"]
    # THEN every event is logged, without job data, to an encrypted log group; X-Ray is on
    assert logging["Level"] == "ALL" and logging["IncludeExecutionData"] is False
    group = logging["Destinations"][0]["CloudWatchLogsLogGroup"]["LogGroupArn"]["Fn::GetAtt"][0]
    assert "KmsKeyId" in synth.resources[group]["Properties"]
    assert props["TracingConfiguration"] == {"Enabled": True}


def test_state_machine_is_granted_every_integration_explicitly(synth: Synthesized) -> None:
    # GIVEN the state machine role's statements
    props = _machine(synth)
    role = props["RoleArn"]["Fn::GetAtt"][0]
    stmts = _policy_of_role(synth, role)
    steps = next(k for k in synth.of_type("AWS::Lambda::Function") if k.startswith("WorkflowFunctionsSteps"))
    task, task_def = synth.one("AWS::ECS::TaskDefinition")
    queues = synth.of_type("AWS::Batch::JobQueue")
    job_definitions = synth.of_type("AWS::Batch::JobDefinition")
    # THEN it may invoke the workflow function, run the task (passing only its roles), submit to every Batch
    # runner's queue and job definition (the GPU one and one per instance family)
    assert _allows(stmts, "lambda:InvokeFunction", f"<{steps}.Arn>")
    assert _allows(stmts, "ecs:RunTask", f"<{task}>")
    for role_ref in (task_def["Properties"]["TaskRoleArn"], task_def["Properties"]["ExecutionRoleArn"]):
        assert _allows(stmts, "iam:PassRole", resolve(role_ref))
    assert len(queues) == len(job_definitions) > 1
    for queue in queues:
        assert _allows(stmts, "batch:SubmitJob", f"<{queue}>") or _allows(stmts, "batch:SubmitJob",
                                                                         f"<{queue}.JobQueueArn>"), queue
    for job_definition in job_definitions:
        assert _allows(stmts, "batch:SubmitJob", f"<{job_definition}>"), job_definition
    # AND manage the ECS/Batch event rules Step Functions uses, and nothing broader
    for rule in MANAGED_RULES:
        arn = f"arn:<AWS::Partition>:events:<AWS::Region>:<AWS::AccountId>:rule/{rule}"
        for action in ("events:PutTargets", "events:PutRule", "events:DescribeRule"):
            assert _allows(stmts, action, arn), (action, rule)
    pass_role = [s for s in stmts if "iam:PassRole" in as_list(s["Action"])]
    assert all(s["Condition"] == {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}
               for s in pass_role)


def test_functions_know_the_state_machine_by_its_real_arn(synth: Synthesized) -> None:
    # GIVEN the state machine's name and the ARN the functions were configured with
    name = _machine(synth)["StateMachineName"]
    for fn_id, fn in synth.of_type("AWS::Lambda::Function").items():
        arn = resolve(fn["Properties"]["Environment"]["Variables"]["KILN_STATE_MACHINE_ARN"])
        # THEN it is that state machine's ARN (built from the name to avoid a dependency cycle)
        assert arn == f"arn:<AWS::Partition>:states:<AWS::Region>:<AWS::AccountId>:stateMachine:{name}", fn_id
