"""Fixtures for the pure-logic unit tests (no AWS)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROLE = "arn:aws:iam::123456789012:role/kiln-compilation-job"


def create_request(**overrides: Any) -> dict[str, Any]:
    """A valid CreateCompilationJob request (ONNX on ml_c4) with top-level overrides."""
    request: dict[str, Any] = {
        "CompilationJobName": "unit-job",
        "RoleArn": ROLE,
        "InputConfig": {"S3Uri": "s3://models-bucket/unit/model.tar.gz", "Framework": "ONNX",
                        "DataInputConfig": '{"x": [1, 8]}'},
        "OutputConfig": {"S3OutputLocation": "s3://artifacts-bucket/unit", "TargetDevice": "ml_c4"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }
    request.update(copy.deepcopy(overrides))
    return request


@pytest.fixture
def make_request() -> Callable[..., dict[str, Any]]:
    return create_request


# Every setting a deployment must give (kiln.config.KilnSettings has no default for them).
COMPLETE = {"KILN_ACCOUNT_ID": "123456789012", "KILN_TABLE_NAME": "kiln-jobs-prod",
            "KILN_STATE_MACHINE_ARN": "arn:aws:states:eu-west-1:123456789012:stateMachine:kiln",
            "KILN_PAGINATION_KEY": "a-deployment-secret", "KILN_ECS_CLUSTER": "arn:aws:ecs:eu-west-1:1:cluster/kiln",
            "KILN_GPU_JOB_QUEUE": "arn:aws:batch:eu-west-1:1:job-queue/kiln-gpu", "AWS_REGION": "eu-west-1"}


@pytest.fixture
def deployment_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment of a complete deployment (as CDK sets it on a Lambda)."""
    for key, value in COMPLETE.items():
        monkeypatch.setenv(key, value)
    return COMPLETE


def load_bench_module(name: str) -> ModuleType:
    """bench/<name>.py imported as module ``bench_<name>`` (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module
