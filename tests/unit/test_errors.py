"""One list of retryable AWS error codes, used by every step that decides a retry."""

from __future__ import annotations

import ast
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from kiln.errors import RETRYABLE_ERROR_CODES, error_code, is_retryable
from kiln.workflow import JobClientError, TransientError, WorkflowSteps

KILN = Path(__file__).resolve().parents[2] / "functions" / "kiln"
PACKAGE_ARN = "arn:aws:sagemaker:us-east-1:123456789012:model-package/vision/1"


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "AnyOperation")


def test_retryable_codes_are_retryable_and_caller_errors_are_not() -> None:
    # GIVEN every listed code and some caller errors  WHEN classified  THEN only the listed ones retry
    assert all(is_retryable(_client_error(code)) for code in RETRYABLE_ERROR_CODES)
    for code in ("ConditionalCheckFailedException", "ValidationException", "ResourceLimitExceeded", "AccessDenied"):
        assert not is_retryable(_client_error(code))
    assert not is_retryable(ValueError("ThrottlingException")) and error_code(ValueError()) == "ValueError"


def test_no_other_module_lists_retryable_codes() -> None:
    # GIVEN Kiln's function modules  WHEN their literals are read  THEN only kiln/errors.py names throttling codes
    offenders = []
    for path in KILN.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("ThrottlingException", "ServiceUnavailable"):
                offenders.append(f"{path.relative_to(KILN)}:{node.lineno}")
    assert offenders and all(o.startswith("errors.py:") for o in offenders), offenders


@pytest.mark.parametrize(("code", "raised"), [("ThrottlingException", TransientError),
                                              ("InternalFailure", TransientError),
                                              ("ValidationException", JobClientError)])
def test_model_package_step_retries_exactly_the_retryable_codes(code: str, raised: type[Exception]) -> None:
    # GIVEN SageMaker answering DescribeModelPackage with an error (botocore's Stubber)
    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    steps = WorkflowSteps(None, sagemaker=sagemaker, containers=None)  # type: ignore[arg-type]
    with Stubber(sagemaker) as stub:
        stub.add_client_error("describe_model_package", service_error_code=code)
        # WHEN the ResolveModelPackage step runs  THEN a retryable code retries, any other fails the job
        with pytest.raises(raised):
            steps.resolve_model_package({"CompilationJobName": "j", "ModelPackageVersionArn": PACKAGE_ARN,
                                         "OutputConfig": {"TargetDevice": "ml_c4"}})
