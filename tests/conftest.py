"""Fixtures shared by every test layer: the embedded stack, the local API server, small real models."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "Kiln")


def tiny_onnx_model(seed: int = 0) -> onnx.ModelProto:
    """A real (small) network: MatMul -> Add -> Relu on a [1, 8] input, random weights."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A .tar.gz holding ``files`` (name -> content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def event_for(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
              query: dict[str, Any] | None = None, raw: bytes | None = None) -> dict[str, Any]:
    """The proxy event for an HTTP request, checked against Powertools' model."""
    from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventModel
    from kiln.local.server import proxy_event
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    builder = EnvironBuilder(path=path, method=method, data=data, headers=headers or {}, query_string=query,
                             base_url="http://127.0.0.1:8080")
    event = proxy_event(Request(builder.get_environ()))
    model = APIGatewayProxyEventModel.model_validate(event)
    assert model.httpMethod == method and model.path == path
    return event


@pytest.fixture(scope="session")
def resolve(local_stack: Any) -> Any:
    """build_resolver over the service of the embedded stack (moto): event in, parsed response out."""
    from kiln.api import build_resolver
    from kiln.local.server import _Context

    app = build_resolver(lambda: local_stack.kiln.service)

    def call(event: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
        response = app.resolve(event, _Context())
        headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
        for key, values in (response.get("multiValueHeaders") or {}).items():
            headers[key.lower()] = ", ".join(values)
        return response["statusCode"], headers, json.loads(response["body"]) if response.get("body") else None

    return call


@pytest.fixture(scope="session")
def tiny_onnx_archive() -> bytes:
    return tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()})


@pytest.fixture(scope="session")
def local_stack() -> Iterator[Any]:
    """One embedded stack (moto server + Kiln's resources) per test session (per xdist worker)."""
    from kiln.local.stack import EmbeddedStack

    stack = EmbeddedStack(max_active_jobs=1000).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def api_server(local_stack: Any) -> Iterator[Any]:
    """``kiln serve``'s HTTP server over the embedded stack."""
    from kiln.local.server import ApiServer

    server = ApiServer("127.0.0.1", 0).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sagemaker(api_server: Any) -> Any:
    """A stock boto3 SageMaker client pointed at Kiln (only endpoint_url changes)."""
    return boto3.client("sagemaker", endpoint_url=api_server.url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture(scope="session")
def upload_model(local_stack: Any) -> Callable[[str, bytes], str]:
    """Put an archive in the embedded S3; returns its s3:// URI."""
    s3 = local_stack.client("s3")

    def upload(key: str, data: bytes) -> str:
        s3.put_object(Bucket=local_stack.outputs["ModelBucket"], Key=key, Body=data)
        return f"s3://{local_stack.outputs['ModelBucket']}/{key}"

    return upload


@pytest.fixture(scope="session")
def job_request(local_stack: Any) -> Callable[..., dict[str, Any]]:
    """A valid CreateCompilationJob request, with overrides."""

    def build(name: str, **overrides: Any) -> dict[str, Any]:
        request: dict[str, Any] = {
            "CompilationJobName": name,
            "RoleArn": local_stack.outputs["JobRoleArn"],
            "InputConfig": {"S3Uri": f"s3://{local_stack.outputs['ModelBucket']}/{name}/model.tar.gz",
                            "Framework": "ONNX", "DataInputConfig": '{"x": [1, 8]}'},
            "OutputConfig": {"S3OutputLocation": f"s3://{local_stack.outputs['ArtifactBucket']}/{name}",
                             "TargetDevice": "ml_c4"},
            "StoppingCondition": {"MaxRuntimeInSeconds": 600},
        }
        request.update(overrides)
        return request

    return build
