"""Fixtures for the pure-logic unit tests (no AWS)."""

from __future__ import annotations

import copy
from collections.abc import Callable
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
