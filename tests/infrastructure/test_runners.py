"""Compiler runners: read-only, non-root containers with a scratch volume; the compiler role's reach."""

from __future__ import annotations

import json
import re
from typing import Any

from kiln_infra.paths import COMPILER_DOCKERFILE, COMPILER_GPU_DOCKERFILE, REPO_ROOT
from kiln_infra.runners import ENTRY_POINT, JOB_ROLE_TAG, SCRATCH

from .conftest import Synthesized, as_list, statements


def _gpu(synth: Synthesized, kind: str) -> dict[str, Any]:
    (resource,) = [r for k, r in synth.of_type(kind).items() if k.startswith("CompilerRunnersGpu")]
    return resource


def _dockerfile_uid(path: str) -> str:
    text = (REPO_ROOT / path).read_text()
    return re.search(r"--uid\s+(\d+)", text)[1]  # type: ignore[index]


def test_fargate_task_is_read_only_non_root_with_scratch(synth: Synthesized) -> None:
    # GIVEN the Fargate task definition of CPU compiles
    _, task = synth.one("AWS::ECS::TaskDefinition")
    props = task["Properties"]
    (container,) = props["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    # THEN its container has a read-only root filesystem and runs as the image's non-root user
    assert container["ReadonlyRootFilesystem"] is True
    assert container["User"] not in ("", "0", "root") and not container["User"].startswith(("0:", "root"))
    assert container["User"] == _dockerfile_uid(COMPILER_DOCKERFILE)
    # AND writes only to its scratch and /tmp volumes; the compiler is told to work in scratch
    mounts = {m["ContainerPath"]: m for m in container["MountPoints"]}
    assert set(mounts) == {SCRATCH, "/tmp"} and not any(m["ReadOnly"] for m in mounts.values())
    assert {v["Name"] for v in props["Volumes"]} == {m["SourceVolume"] for m in mounts.values()}
    assert env["KILN_WORK_DIR"] == SCRATCH
    # AND it runs python -m kiln_compiler, logs with awslogs, on Fargate in awsvpc mode
    assert container["EntryPoint"] == ENTRY_POINT
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert props["RequiresCompatibilities"] == ["FARGATE"] and props["NetworkMode"] == "awsvpc"


def test_batch_gpu_job_is_read_only_non_root_with_scratch(synth: Synthesized) -> None:
    # GIVEN the Batch job definition of GPU compiles
    job = _gpu(synth, "AWS::Batch::JobDefinition")
    container = job["Properties"]["ContainerProperties"]
    # THEN it is read-only, non-root (the GPU image's user), asks for one GPU and logs with awslogs
    assert container["ReadonlyRootFilesystem"] is True
    assert container["User"] == _dockerfile_uid(COMPILER_GPU_DOCKERFILE)
    assert {"Type": "GPU", "Value": "1"} in container["ResourceRequirements"]
    assert container["Command"] == ENTRY_POINT
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert {m["ContainerPath"] for m in container["MountPoints"]} == {SCRATCH, "/tmp"}


def test_gpu_compute_environment_is_private_and_scales_to_zero(synth: Synthesized) -> None:
    # GIVEN the Batch GPU compute environment
    environment = _gpu(synth, "AWS::Batch::ComputeEnvironment")
    resources = environment["Properties"]["ComputeResources"]
    # THEN it scales to zero, uses NVIDIA instances of the GPU AMI, with IMDSv2 through its launch template
    assert resources["MinvCpus"] == 0
    assert all(t.startswith(("g4dn", "g5", "g6", "p")) for t in resources["InstanceTypes"])
    assert resources["Ec2Configuration"][0]["ImageType"] == "ECS_AL2023_NVIDIA"
    for template in synth.of_type("AWS::EC2::LaunchTemplate").values():
        assert template["Properties"]["LaunchTemplateData"]["MetadataOptions"]["HttpTokens"] == "required"


def test_compiler_role_only_reports_and_assumes_tagged_job_roles(synth: Synthesized) -> None:
    # GIVEN the role the compiler containers run with
    _, task = synth.one("AWS::ECS::TaskDefinition")
    role_id = task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
    role = synth.resources[role_id]["Properties"]
    stmts = [s for p in synth.of_type("AWS::IAM::Policy").values() if {"Ref": role_id} in p["Properties"]["Roles"]
             for s in statements(p["Properties"]["PolicyDocument"])]
    # THEN only ECS tasks of this account may assume it
    (trust,) = statements(role["AssumeRolePolicyDocument"])
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    # AND it may do three things: answer its task token, assume job roles tagged for Kiln, and read and write the
    # shared tuning records (their statements: tests/infrastructure/test_tuning_records.py)
    actions = sorted(a for s in stmts for a in as_list(s["Action"]) if not s["Sid"].endswith(("TuningRecords",
                                                                                               "TuningRecordsKey")))
    assert actions == ["states:SendTaskFailure", "states:SendTaskHeartbeat", "states:SendTaskSuccess",
                       "sts:AssumeRole"]
    assert sorted(s["Sid"] for s in stmts if "TuningRecords" in s["Sid"]) == [
        "ListSharedTuningRecords", "ReadWriteSharedTuningRecords", "SharedTuningRecordsKey"]
    (assume,) = [s for s in stmts if s["Action"] == "sts:AssumeRole"]
    assert assume["Condition"] == {"StringEquals": {f"aws:ResourceTag/{JOB_ROLE_TAG}": "true"}}
    # AND the same role is every Batch job's role, GPU and instance families (one principal for job roles to trust)
    for job in synth.of_type("AWS::Batch::JobDefinition").values():
        assert job["Properties"]["ContainerProperties"]["JobRoleArn"] == {"Fn::GetAtt": [role_id, "Arn"]}


def test_network_has_no_internet_path(synth: Synthesized) -> None:
    # GIVEN the created VPC
    # THEN there is no internet or NAT gateway, and the compilers reach AWS through endpoints
    assert not synth.of_type("AWS::EC2::InternetGateway") and not synth.of_type("AWS::EC2::NatGateway")
    endpoints = synth.of_type("AWS::EC2::VPCEndpoint").values()
    names = {str(e["Properties"]["ServiceName"]) for e in endpoints}
    for service in ("s3", "ecr.api", "ecr.dkr", "logs", "states", "sts", "ecs-agent"):
        assert any(f".{service}" in n or f"{service}'" in n or n.endswith(service) for n in names), service
    # AND the compilers' security group has no ingress
    groups = [g for k, g in synth.of_type("AWS::EC2::SecurityGroup").items() if "CompilerSecurityGroup" in k]
    assert len(groups) == 1 and "SecurityGroupIngress" not in groups[0]["Properties"]
    assert synth.of_type("AWS::EC2::FlowLog")


def test_cpu_only_deployment_into_an_existing_vpc(synth_cpu_only_imported_vpc: Synthesized) -> None:
    # GIVEN a deployment with GPU targets off, into an imported VPC, without deletion protection
    synth = synth_cpu_only_imported_vpc
    # THEN it has no GPU Batch resources and creates no VPC; the API refuses GPU targets
    assert not [k for k in synth.of_type("AWS::Batch::JobQueue") if "Gpu" in k] and not synth.of_type("AWS::EC2::VPC")
    (fn,) = [f for k, f in synth.of_type("AWS::Lambda::Function").items() if k.startswith("ApiFunction")]
    variables = fn["Properties"]["Environment"]["Variables"]
    assert variables["KILN_ENABLED_RUNNERS"].split(",") == ["fargate", "batch-c5", "batch-c6g", "batch-c7g"]
    # AND the functions send compilers to the imported subnets
    assert variables["KILN_SUBNETS"] == "subnet-aaa,subnet-bbb"
    _, table = synth.one("AWS::DynamoDB::Table")
    assert table["Properties"]["DeletionProtectionEnabled"] is False


def _family_resources(synth: Synthesized, kind: str) -> dict[str, dict[str, Any]]:
    """Resources of the Batch CPU families, by family (C5, C6G, ...), from their logical IDs."""
    found = {}
    for logical_id, resource in synth.of_type(kind).items():
        match = re.fullmatch(r"CompilerRunners([A-Z0-9]+?)(ComputeEnvironment|JobQueue|JobDefinition)[0-9A-F]{8}",
                             logical_id)
        if match and match[1] != "Gpu".upper() and not logical_id.startswith("CompilerRunnersGpu"):
            found[match[1]] = resource
    return found


def test_each_enabled_family_has_a_compute_environment_scaling_to_zero(
        synth_cpu_only_imported_vpc: Synthesized) -> None:
    # GIVEN a deployment enabling the c5, c6g and c7g families
    synth = synth_cpu_only_imported_vpc
    environments = _family_resources(synth, "AWS::Batch::ComputeEnvironment")
    # THEN each family has its own compute environment of that instance class only, from 0 vCPUs, on ECS's AMI
    assert sorted(environments) == ["C5", "C6G", "C7G"]
    for family, environment in environments.items():
        resources = environment["Properties"]["ComputeResources"]
        assert resources["InstanceTypes"] == [family.lower()] and resources["MinvCpus"] == 0
        assert resources["Ec2Configuration"][0]["ImageType"] == "ECS_AL2023"
    # AND each job definition is read-only, non-root, tells the compiler which runner it is, and its queue and
    # definition are what the functions put in an execution's Placement
    definitions = _family_resources(synth, "AWS::Batch::JobDefinition")
    (fn,) = [f for k, f in synth.of_type("AWS::Lambda::Function").items() if k.startswith("ApiFunction")]
    placements = fn["Properties"]["Environment"]["Variables"]["KILN_RUNNER_PLACEMENTS"]
    rendered = json.dumps(placements)
    for family, definition in definitions.items():
        container = definition["Properties"]["ContainerProperties"]
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert env["KILN_RUNNER"] == f"batch-{family.lower()}"
        assert container["ReadonlyRootFilesystem"] is True and container["User"] == _dockerfile_uid(COMPILER_DOCKERFILE)
        logical_id = next(k for k, v in synth.of_type("AWS::Batch::JobDefinition").items() if v is definition)
        assert logical_id in rendered and f"batch-{family.lower()}" in rendered


def test_graviton_families_run_the_same_dockerfile_built_for_arm64(synth_cpu_only_imported_vpc: Synthesized,
                                                                  synth: Synthesized) -> None:
    # GIVEN the docker image assets of a deployment with Graviton families, and of the default one (without)
    def platforms(s: Synthesized) -> dict[str, set[str]]:
        manifest = json.loads((s.template_path.parent / "Kiln.assets.json").read_text())
        found: dict[str, set[str]] = {}
        for image in manifest["dockerImages"].values():
            found.setdefault(image["source"]["dockerFile"], set()).add(image["source"].get("platform", ""))
        return found
    # THEN the compiler Dockerfile is built for linux/amd64 and linux/arm64 where Graviton is on, amd64 only otherwise
    assert platforms(synth_cpu_only_imported_vpc)[COMPILER_DOCKERFILE] == {"linux/amd64", "linux/arm64"}
    assert platforms(synth)[COMPILER_DOCKERFILE] == {"linux/amd64"}
    # AND the Graviton job definitions use the arm64 image, the x86 ones the amd64 image
    definitions = _family_resources(synth_cpu_only_imported_vpc, "AWS::Batch::JobDefinition")
    image = {f: json.dumps(d["Properties"]["ContainerProperties"]["Image"]) for f, d in definitions.items()}
    assert image["C6G"] == image["C7G"] != image["C5"]
