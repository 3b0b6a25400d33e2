"""The SageMaker SDK's flows against `kiln serve`, then the compiled model served as its InferenceImage would.

The SDK runs in its own environment (``.venv-sagemaker``, requirements/sagemaker-sdk.txt, created by
``make install``): sagemaker 2.x cannot share the test environment's packaging/attrs/protobuf.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import onnxruntime as ort
import pytest
from kiln.inference_images import LOCAL_IMAGES

from tests.conftest import tar_gz, tiny_onnx_model

ROOT = Path(__file__).resolve().parents[2]
SDK_PYTHON = ROOT / ".venv-sagemaker" / "bin" / "python"
ROLE = "arn:aws:iam::123456789012:role/kiln-compilation-job"


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    """The SDK environment's interpreter (CI must have it: make install creates it)."""
    if not SDK_PYTHON.exists():
        message = f"the SageMaker SDK environment is not installed ({SDK_PYTHON}); run make install"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SDK_PYTHON


@pytest.mark.slow
def test_model_compile_and_sagemaker_core_against_kiln_then_the_artifact_is_served(
        served: tuple[str, str, Path], sdk_python: Path, serve_model: Callable[..., str], tmp_path: Path) -> None:
    api, aws, _ = served
    kw = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    s3 = boto3.client("s3", endpoint_url=aws, **kw)
    # GIVEN the tiny ONNX network uploaded to the embedded S3, as a user's model.tar.gz
    s3.put_object(Bucket="kiln-local-models", Key="sdk/model.tar.gz",
                  Body=tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
    request = {"region": "us-east-1", "bucket": "kiln-local-artifacts", "role": ROLE, "target": "ml_c4",
               "model_data": "s3://kiln-local-models/sdk/model.tar.gz", "input_shape": {"x": [1, 8]},
               "output_path": "s3://kiln-local-artifacts/sdk", "sdk_job": "sdk-model-compile",
               "core_job": "sdk-core-compilation-job"}
    # WHEN the stock SDK's Model.compile() and sagemaker-core's CompilationJob run against Kiln, pointed at it
    # only through botocore's endpoint variables
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AWS_ENDPOINT_URL_SAGEMAKER": api,
           "AWS_ENDPOINT_URL_S3": aws, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "SAGEMAKER_SUPPRESS_V2_WARNING": "1"}
    proc = subprocess.run([str(sdk_python), str(ROOT / "tests" / "e2e" / "sagemaker_sdk_flow.py"), json.dumps(request)],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # THEN Model.compile() took Kiln's artifact as model_data and Kiln's serving image as image_uri
    sdk = result["sdk"]
    assert sdk["model_data"] == "s3://kiln-local-artifacts/sdk/model-ml_c4.tar.gz"
    assert sdk["image_uri"] == LOCAL_IMAGES["x86_64"]
    assert sdk["is_compiled"] is True and sdk["job_name"] == "sdk-model-compile"
    # AND sagemaker-core created, waited for and got the job through its validated shapes
    core = result["core"]
    assert core["status"] == "COMPLETED" and core["target"] == "ml_c4"
    assert core["artifact"] == "s3://kiln-local-artifacts/sdk/core/model-ml_c4.tar.gz"
    assert core["inference_image"] == LOCAL_IMAGES["x86_64"] and core["digest"].startswith("sha256:")
    assert core["arn"].endswith(":compilation-job/sdk-core-compilation-job")
    # AND the serving process on that artifact answers /invocations with ONNX Runtime's outputs, both as the image
    # starts it (python -m kiln_serving serve, the archive unpacked in a model directory) and as kiln serve-model
    artifact = tmp_path / "model-ml_c4.tar.gz"
    s3.download_file("kiln-local-artifacts", "sdk/model-ml_c4.tar.gz", str(artifact))
    model_dir = tmp_path / "opt-ml-model"
    with tarfile.open(artifact) as tar:
        tar.extractall(model_dir, filter="data")
    image_like = serve_model(model_dir, [sys.executable, "-m", "kiln_serving", "serve"],
                             env={**os.environ, "KILN_SERVING_MODEL": str(model_dir), "KILN_SERVING_HOST": "127.0.0.1",
                                  "KILN_SERVING_PORT": "{port}"})
    cli = serve_model(artifact)
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x)
    session = ort.InferenceSession(tiny_onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])
    for url in (image_like, cli):
        call = urllib.request.Request(url + "/invocations", data=buffer.getvalue(), method="POST",
                                      headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        with urllib.request.urlopen(call, timeout=60) as response:
            got = np.load(io.BytesIO(response.read()), allow_pickle=False)
        np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
