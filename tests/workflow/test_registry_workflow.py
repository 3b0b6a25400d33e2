"""End to end in the embedded stack: an approval event put on the embedded EventBridge compiles a
real (tiny) ONNX model for every tagged target, and the compiled artifacts appear in the model
package. Everything runs as in ``kiln serve``: rules on the bus, the registry Lambda, the state
machine, the compiler entrypoint as a local process (the session's ``local_stack``)."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest
from kiln.local.stack import EmbeddedStack

GROUP = f"wf-registry-{uuid.uuid4().hex[:8]}"  # the stack is shared by the session
TARGETS = "ml_c4 lambda LINUX/X86_64 ml_inf1"  # three compilable targets and a refused one
COMPILED = {"ml_c4": "ml-c4", "lambda": "lambda", "LINUX/X86_64": "LINUX-X86-64"}


@pytest.fixture(scope="module")
def stack(local_stack: EmbeddedStack) -> EmbeddedStack:
    return local_stack


@pytest.fixture(scope="module")
def package(stack: EmbeddedStack, tiny_onnx_archive: bytes) -> str:
    """An approved version of a group tagged with the targets, its model (tiny ONNX) in the embedded S3."""
    bucket = stack.outputs["ModelBucket"]
    stack.client("s3").put_object(Bucket=bucket, Key=f"{GROUP}/model.tar.gz", Body=tiny_onnx_archive)
    sagemaker = stack.client("sagemaker")
    sagemaker.create_model_package_group(ModelPackageGroupName=GROUP, Tags=[{"Key": "kiln:targets", "Value": TARGETS}])
    return str(sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus="Approved",
        InferenceSpecification={
            "Containers": [{"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/serve:1",
                            "ModelDataUrl": f"s3://{bucket}/{GROUP}/model.tar.gz", "Framework": "ONNX",
                            "ModelInput": {"DataInputConfig": '{"x": [1, 8]}'}}],
            "SupportedContentTypes": ["application/json"], "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"])


def put_state_change(stack: EmbeddedStack, package_arn: str, status: str) -> None:
    """Put a SageMaker Model Package State Change event (the real detail shape) on the embedded bus."""
    sagemaker = stack.client("sagemaker")
    described = sagemaker.describe_model_package(ModelPackageName=package_arn)
    detail = {"ModelPackageGroupName": described["ModelPackageGroupName"],
              "ModelPackageVersion": described["ModelPackageVersion"], "ModelPackageArn": package_arn,
              "CreationTime": int(described["CreationTime"].timestamp() * 1000),
              "InferenceSpecification": described["InferenceSpecification"],
              "ModelApprovalStatus": status, "ModelPackageStatus": described["ModelPackageStatus"],
              "ModelPackageStatusDetails": described["ModelPackageStatusDetails"]}
    response = stack.client("events").put_events(Entries=[{
        "Source": "aws.sagemaker", "DetailType": "SageMaker Model Package State Change",
        "Resources": [package_arn], "Detail": json.dumps(detail)}])
    assert response["FailedEntryCount"] == 0


def job_names(stack: EmbeddedStack) -> list[str]:
    summaries = stack.kiln.service.list({"MaxResults": 100, "NameContains": GROUP})["CompilationJobSummaries"]
    return sorted(s["CompilationJobName"] for s in summaries)


def specs(stack: EmbeddedStack, package_arn: str) -> list[dict[str, Any]]:
    described = stack.client("sagemaker").describe_model_package(ModelPackageName=package_arn)
    return list(described.get("AdditionalInferenceSpecifications") or [])


def test_approval_event_compiles_every_target_and_writes_the_artifacts_back(
        stack: EmbeddedStack, package: str, caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN an approved package version of a group tagged with three targets and an unknown one
    assert job_names(stack) == []

    # WHEN its approval event is put on the embedded EventBridge and the jobs run to the end
    with caplog.at_level(logging.INFO, logger="kiln.registry"):
        put_state_change(stack, package, "Approved")
        assert stack.wait_for_registry(timeout=60)
        names = job_names(stack)
        finished = {name: stack.wait_for(name, timeout=180) for name in names}
        assert stack.wait_for_registry(timeout=60)

    # THEN one job per compilable target ran to COMPLETED from the package's model
    assert len(names) == len(COMPILED)
    for job in finished.values():
        assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
        assert job["ModelPackageVersionArn"] == package
    # AND the refused target was skipped with its reason in the log
    assert f"skipping target 'ml_inf1' for {package}" in caplog.text and "Neuron" in caplog.text
    # AND the package lists every artifact (they finished together), one specification per target
    artifacts = {job["ModelArtifacts"]["S3ModelArtifacts"] for job in finished.values()}
    listed = {s["Name"]: s["Containers"][0]["ModelDataUrl"] for s in specs(stack, package)}
    assert sorted(listed) == sorted(COMPILED.values())
    assert set(listed.values()) == artifacts
    s3 = stack.client("s3")
    for uri in artifacts:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        assert key.startswith(f"registry/{GROUP}/1/")
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    # AND each job is tagged with the package and the specification it produced
    for job in finished.values():
        tags = {t["Key"]: t["Value"] for t in
                stack.kiln.service.list_tags({"ResourceArn": job["CompilationJobArn"]})["Tags"]}
        assert tags["kiln:model-package-arn"] == package and tags["kiln:source"] == "registry"
        assert tags["kiln:registry-specification"] == COMPILED[tags["kiln:target"]]
    # AND the package is still approved
    assert stack.client("sagemaker").describe_model_package(ModelPackageName=package)["ModelApprovalStatus"] == "Approved"


def test_redelivered_approval_event_creates_no_jobs(stack: EmbeddedStack, package: str) -> None:
    # GIVEN the jobs and specifications of the approval above
    before, listed = job_names(stack), specs(stack, package)
    assert len(before) == len(COMPILED)

    # WHEN the same approval event is delivered again
    put_state_change(stack, package, "Approved")
    assert stack.wait_for_registry(timeout=60)

    # THEN no job is created and the package is unchanged
    assert job_names(stack) == before
    assert specs(stack, package) == listed


@pytest.mark.parametrize("status", ["Rejected", "PendingManualApproval"])
def test_rejected_or_pending_version_creates_no_jobs(stack: EmbeddedStack, package: str, status: str) -> None:
    # GIVEN a second version of the tagged group that is not approved
    sagemaker = stack.client("sagemaker")
    arn = sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
        InferenceSpecification=sagemaker.describe_model_package(ModelPackageName=package)["InferenceSpecification"],
    )["ModelPackageArn"]
    before = job_names(stack)

    # WHEN its state change event is put on the bus
    put_state_change(stack, arn, status)
    assert stack.wait_for_registry(timeout=60)

    # THEN no job is created for it
    assert job_names(stack) == before
    assert specs(stack, arn) == []
