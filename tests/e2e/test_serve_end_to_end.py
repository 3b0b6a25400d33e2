"""End to end: `kiln serve` as a process, a stock boto3 client, a real model, the artifact run locally."""

from __future__ import annotations

import io
import json
import tarfile
import time

import boto3
import numpy as np
import onnxruntime as ort
import pytest
from botocore.exceptions import ClientError
from kiln import runtime
from kiln_compiler.samples import input_shapes, load_light_model


def test_compile_a_real_model_through_the_served_api(served, tmp_path):
    api, aws, log = served
    kw = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    sagemaker = boto3.client("sagemaker", endpoint_url=api, **kw)
    s3 = boto3.client("s3", endpoint_url=aws, **kw)
    # GIVEN a real architecture (SqueezeNet from the onnx package) uploaded to the embedded S3
    model = load_light_model("squeezenet")
    shapes = input_shapes(model)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = model.SerializeToString()
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    s3.put_object(Bucket="kiln-local-models", Key="e2e/squeezenet.tar.gz", Body=buffer.getvalue())
    # WHEN a stock boto3 client creates the job and polls it
    sagemaker.create_compilation_job(
        CompilationJobName="e2e-squeezenet", RoleArn="arn:aws:iam::123456789012:role/kiln-compilation-job",
        InputConfig={"S3Uri": "s3://kiln-local-models/e2e/squeezenet.tar.gz", "Framework": "ONNX",
                     "DataInputConfig": json.dumps({k: list(v) for k, v in shapes.items()})},
        OutputConfig={"S3OutputLocation": "s3://kiln-local-artifacts/e2e", "TargetDevice": "ml_c4"},
        StoppingCondition={"MaxRuntimeInSeconds": 600})
    with pytest.raises(ClientError) as duplicate:
        sagemaker.create_compilation_job(
            CompilationJobName="e2e-squeezenet", RoleArn="arn:aws:iam::123456789012:role/kiln-compilation-job",
            InputConfig={"S3Uri": "s3://kiln-local-models/e2e/squeezenet.tar.gz", "Framework": "ONNX"},
            OutputConfig={"S3OutputLocation": "s3://kiln-local-artifacts/e2e", "TargetDevice": "ml_c4"},
            StoppingCondition={"MaxRuntimeInSeconds": 600})
    deadline = time.time() + 600
    while True:
        job = sagemaker.describe_compilation_job(CompilationJobName="e2e-squeezenet")
        if job["CompilationJobStatus"] in ("COMPLETED", "FAILED", "STOPPED") or time.time() > deadline:
            break
        time.sleep(1)
    # THEN it completes, the artifact is at {S3OutputLocation}/{basename}-{target}.tar.gz ...
    assert duplicate.value.response["Error"]["Code"] == "ResourceInUse"
    assert job["CompilationJobStatus"] == "COMPLETED", job["FailureReason"]
    assert job["ModelArtifacts"]["S3ModelArtifacts"] == "s3://kiln-local-artifacts/e2e/squeezenet-ml_c4.tar.gz"
    local = tmp_path / "squeezenet-ml_c4.tar.gz"
    s3.download_file("kiln-local-artifacts", "e2e/squeezenet-ml_c4.tar.gz", str(local))
    # ... and running it agrees with ONNX Runtime on the same input
    compiled = runtime.load(local)
    feeds = {n: np.random.default_rng(3).standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    np.testing.assert_allclose(compiled.run(feeds)[0], expected, rtol=1e-3, atol=1e-5)
    # AND the server logged one line per request
    assert "[SageMaker.CreateCompilationJob] -> 200" in log.read_text()
    assert "[SageMaker.CreateCompilationJob] -> 400" in log.read_text()
