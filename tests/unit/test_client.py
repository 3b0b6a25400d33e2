"""The signed client helper signs for execute-api and is otherwise a stock SageMaker client."""

from __future__ import annotations

import contextlib

from botocore.stub import Stubber
from kiln.client import sagemaker_client


def test_requests_are_sigv4_signed_for_execute_api():
    # GIVEN a client for a deployed API (region taken from the URL)
    client = sagemaker_client("https://abc123.execute-api.eu-west-1.amazonaws.com/prod",
                              aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")
    captured: dict[str, str] = {}

    def capture(request, **_):
        captured.update({k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})
        raise RuntimeError("captured")  # do not send

    client.meta.events.register("before-send.sagemaker", capture)
    # WHEN it sends a SageMaker call
    with contextlib.suppress(RuntimeError):
        client.list_compilation_jobs()
    # THEN the signature's credential scope is eu-west-1/execute-api, and the target is SageMaker's
    assert "/eu-west-1/execute-api/aws4_request" in captured["Authorization"]
    assert captured["X-Amz-Target"] == "SageMaker.ListCompilationJobs"
    assert client.meta.region_name == "eu-west-1"


def test_it_is_the_stock_sagemaker_client():
    # GIVEN the helper's client WHEN stubbed like any boto3 client THEN the SageMaker operations are there
    client = sagemaker_client("http://127.0.0.1:8080", region_name="us-east-1",
                              aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(client) as stub:
        stub.add_response("describe_compilation_job", {
            "CompilationJobName": "j", "CompilationJobArn": "arn:aws:sagemaker:us-east-1:123456789012:compilation-job/j",
            "CompilationJobStatus": "COMPLETED", "StoppingCondition": {}, "CreationTime": 0, "LastModifiedTime": 0,
            "FailureReason": "", "ModelArtifacts": {"S3ModelArtifacts": "s3://b/k"},
            "RoleArn": "arn:aws:iam::123456789012:role/r",
            "InputConfig": {"S3Uri": "s3://b/m.tar.gz", "Framework": "ONNX"},
            "OutputConfig": {"S3OutputLocation": "s3://b/o"}})
        assert client.describe_compilation_job(CompilationJobName="j")["CompilationJobStatus"] == "COMPLETED"
