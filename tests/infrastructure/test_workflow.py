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


def test_tuning_workers_fan_out_in_a_map_over_the_same_runner_states(synth: Synthesized) -> None:
    # GIVEN the deployed definition (ADR 0023: CompilerOptions tuning.workers > 1)
    states = json.loads(_machine(synth)["DefinitionString"])["States"]
    fan_out, tune = states["FanOutTuning"], states["TuneInParallel"]
    # THEN a job with more than one worker goes through a Map over its shards before the build, others straight on
    assert fan_out["Choices"] == [{"Variable": "$.Tuning.Workers", "NumericGreaterThan": 1, "Next": "TuneInParallel"}]
    assert fan_out["Default"] == "ChooseRunner"
    assert states["HasModelPackage"]["Default"] == states["UseResolvedJob"]["Next"] == "FanOutTuning"
    assert tune["Type"] == "Map" and tune["ItemsPath"] == "$.Tuning.Shards"
    assert tune["ItemSelector"]["Shard.$"] == "$$.Map.Item.Value" and tune["MaxConcurrency"] == 0
    assert tune["ResultPath"] == "$.TuningWorkers" and tune["Next"] == "PlanBuild"
    assert tune["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.Error", "Next": "RecordFailure"}]
    # AND each worker runs on the job's runner with the build's own integration, container and limits,
    # told its shard through KILN_TUNING_SHARD
    inner = tune["ItemProcessor"]["States"]
    for worker, build in (("TuneOnFargate", "CompileOnFargate"), ("TuneOnBatch", "CompileOnBatch")):
        w, b = inner[worker], states[build]
        assert w["Resource"] == b["Resource"] and w["Resource"].endswith(".waitForTaskToken")
        assert w["HeartbeatSecondsPath"] == b["HeartbeatSecondsPath"]
        assert w["TimeoutSecondsPath"] == b["TimeoutSecondsPath"] == "$.Limits.TotalSeconds"
        params = dict(w["Parameters"])
        overrides = params.pop("Overrides", None) or params.pop("ContainerOverrides")
        env = (overrides["ContainerOverrides"][0] if "ContainerOverrides" in overrides else overrides)["Environment"]
        assert {"Name": "KILN_TUNING_SHARD", "Value.$": "$.Shard"} in env
        build_params = {k: v for k, v in b["Parameters"].items() if k not in ("Overrides", "ContainerOverrides")}
        assert params == build_params
        # a stop or a limit ends the job; any other failure loses only that worker's records
        limit, other = w["Catch"]
        assert set(limit["ErrorEquals"]) == {"Kiln.Stopped", "Kiln.MaxRuntimeExceeded", "States.Timeout",
                                             "States.HeartbeatTimeout"}
        assert inner[limit["Next"]]["Type"] == "Fail" and inner[limit["Next"]]["ErrorPath"] == "$.Error.Error"
        assert other["ErrorEquals"] == ["States.ALL"] and inner[other["Next"]]["Type"] == "Pass"
    # AND the build's state timeout is what is left of the job's limits (PlanBuild, a workflow step)
    plan = states["PlanBuild"]
    assert plan["Parameters"]["FunctionName"] == "${WorkflowFunctionArn}" and plan["ResultPath"] == "$.Limits"
    assert plan["Next"] == "ChooseRunner"
    assert states["RecordSuccess"]["Parameters"]["Payload"]["TuningWorkers.$"] == "$.TuningWorkers"


def test_tuning_workers_need_no_permission_beyond_the_build(synth: Synthesized) -> None:
    # GIVEN the state machine role and the compiler role
    role = _machine(synth)["RoleArn"]["Fn::GetAtt"][0]
    machine_actions = {a for s in _policy_of_role(synth, role) for a in as_list(s["Action"])}
    compiler_role = next(k for k in synth.of_type("AWS::IAM::Role") if k.startswith("CompilerRunnersCompilerRole"))
    compiler_statements = _policy_of_role(synth, compiler_role)
    compiler_actions = {a for s in compiler_statements for a in as_list(s["Action"])}
    # THEN the Map adds no grant: the workers run what the build runs (no Step Functions distributed map, no S3)
    assert not any(a.startswith(("s3:", "states:StartExecution")) for a in machine_actions), machine_actions
    # AND the compiler's own role reaches no S3 but the shared tuning database's bucket: workers put their records
    # under the job's output location with the job's role, as the build puts the artifact
    (bucket,) = [k for k in synth.of_type("AWS::S3::Bucket") if k.startswith("TuningRecordsBucket")]
    s3_resources = [resolve(r) for s in compiler_statements if any(a.startswith("s3:") for a in as_list(s["Action"]))
                    for r in as_list(s["Resource"])]
    assert s3_resources and all(r.startswith(f"<{bucket}.Arn>") for r in s3_resources), s3_resources
    assert "sts:AssumeRole" in compiler_actions
