"""Fixtures for the functional tests: raw clients and HTTP helpers against ``kiln serve``."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.config
import pytest

TERMINAL = ("COMPLETED", "FAILED", "STOPPED")
ACCOUNT = "123456789012"


def record(name: str, created: float, status: str, bucket: str = "kiln-local-models") -> dict[str, Any]:
    """A stored job as the service writes it (for seeding the store directly)."""
    return {"CompilationJobName": name,
            "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:compilation-job/{name}",
            "CompilationJobStatus": status, "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/kiln-compilation-job",
            "InputConfig": {"S3Uri": f"s3://{bucket}/{name}.tar.gz", "Framework": "ONNX"},
            "OutputConfig": {"S3OutputLocation": "s3://kiln-local-artifacts/seeded", "TargetDevice": "ml_c4"},
            "StoppingCondition": {"MaxRuntimeInSeconds": 900, "MaxPendingTimeInSeconds": 3600},
            "CreationTime": created, "LastModifiedTime": created + 5}


@pytest.fixture(scope="session")
def raw_sagemaker(api_server: Any) -> Any:
    """A boto3 SageMaker client that skips botocore's client-side checks, so the server sees bad input."""
    return boto3.client("sagemaker", endpoint_url=api_server.url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=botocore.config.Config(parameter_validation=False, retries={"max_attempts": 1}))


@pytest.fixture
def unique() -> Callable[[str], str]:
    """A job name no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def http(api_server: Any) -> Callable[..., tuple[int, dict[str, str], Any]]:
    """Plain HTTP (urllib): (status, headers, parsed JSON body)."""

    def call(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(api_server.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, response_headers, text = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, response_headers, text = exc.code, dict(exc.headers), exc.read()
        return status, response_headers, json.loads(text) if text else None

    return call


@pytest.fixture(scope="session")
def amz_json(http: Callable[..., Any]) -> Callable[..., tuple[int, dict[str, str], Any]]:
    """A raw SageMaker JSON 1.1 call, as the aws CLI sends it."""

    def call(target: str | None, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Content-Type": "application/x-amz-json-1.1"}
        if target is not None:
            headers["X-Amz-Target"] = target
        return http("POST", "/", body if body is not None else ({} if raw is None else None), headers, raw)

    return call


@pytest.fixture(scope="session")
def wait_terminal(sagemaker: Any) -> Callable[[str], dict[str, Any]]:
    def wait(name: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            job = sagemaker.describe_compilation_job(CompilationJobName=name)
            if job["CompilationJobStatus"] in TERMINAL:
                return job
            assert time.time() < deadline, f"{name} still {job['CompilationJobStatus']} after {timeout} s"
            time.sleep(0.25)

    return wait


@pytest.fixture
def reconfigured(local_stack: Any) -> Callable[..., Any]:
    """Serve the API with other settings (KilnSettings fields) inside a ``with`` block; yields the
    service. Running workflows keep the stack's steps."""

    @contextmanager
    def swap(**changes: Any) -> Iterator[Any]:
        with local_stack.reconfigured(**changes) as kiln:
            yield kiln.service

    return swap


@pytest.fixture
def own_table(local_stack: Any, unique: Callable[[str], str]) -> str:
    """A new, empty job table: a test that counts active jobs must not see other tests' workflows
    finish in the background of the shared stack."""
    from kiln.store import table_definition

    table = unique("kiln-jobs")
    local_stack.client("dynamodb").create_table(**table_definition(table))
    return table


@pytest.fixture(scope="session")
def console(api_server: Any, local_stack: Any) -> Any:
    """The web console over the local API (as `kiln serve` mounts it), driven by werkzeug's test client."""
    from kiln.console.app import Artifacts, ConsoleApp, local_api
    from werkzeug.test import Client

    return Client(ConsoleApp(local_api(api_server.url), Artifacts(local_stack.client("s3"))))
