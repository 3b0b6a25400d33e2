"""Structural validation from botocore's SageMaker model (kiln.contract)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from kiln import contract
from kiln.errors import ValidationError

from .conftest import ROLE, create_request

ARN = "arn:aws:sagemaker:us-east-1:123456789012:compilation-job/unit-job"


def invalid(operation: str, params: Any) -> str:
    with pytest.raises(ValidationError) as info:
        contract.validate_request(operation, params)
    return info.value.message


def test_valid_requests_pass_for_every_operation() -> None:
    # GIVEN a valid request for each operation Kiln serves
    requests = {
        "CreateCompilationJob": create_request(Tags=[{"Key": "team", "Value": "vision"}],
                                               VpcConfig={"SecurityGroupIds": ["sg-1"], "Subnets": ["subnet-1"]}),
        "DescribeCompilationJob": {"CompilationJobName": "unit-job"},
        "ListCompilationJobs": {"MaxResults": 100, "SortBy": "Status", "SortOrder": "Ascending",
                                "NameContains": "unit", "StatusEquals": "FAILED",
                                "CreationTimeAfter": 1700000000, "CreationTimeBefore": "2030-01-01T00:00:00Z"},
        "StopCompilationJob": {"CompilationJobName": "unit-job"},
        "DeleteCompilationJob": {"CompilationJobName": "unit-job"},
        "AddTags": {"ResourceArn": ARN, "Tags": [{"Key": "k", "Value": ""}]},
        "ListTags": {"ResourceArn": ARN, "MaxResults": 50},
        "DeleteTags": {"ResourceArn": ARN, "TagKeys": ["k"]},
    }
    assert set(requests) == set(contract.OPERATIONS)
    for operation, params in requests.items():
        # WHEN it is validated / THEN nothing is raised
        contract.validate_request(operation, params)


def test_message_follows_sagemaker_style() -> None:
    # GIVEN the job name from SageMaker's own error example
    # WHEN it is validated
    message = invalid("CreateCompilationJob", create_request(CompilationJobName="a_b"))
    # THEN the message is exactly SageMaker's
    assert message == ("1 validation error detected: Value 'a_b' at 'compilationJobName' failed to satisfy "
                       "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


CREATE_CASES = [
    # (description, overrides or mutator, member, constraint)
    ("name too long", {"CompilationJobName": "a" * 64}, "compilationJobName", "length less than or equal to 63"),
    ("name empty", {"CompilationJobName": ""}, "compilationJobName", "length greater than or equal to 1"),
    ("name not a string", {"CompilationJobName": 42}, "compilationJobName", "Member must be a string"),
    ("role not an ARN", {"RoleArn": "arn:aws:iam::1:r/x"}, "roleArn", "length greater than or equal to 20"),
    ("role pattern", {"RoleArn": "arn:aws:iam::123456789012:user/alice"}, "roleArn", "regular expression pattern"),
    ("package ARN pattern", {"ModelPackageVersionArn": "arn:aws:sagemaker:us-east-1:123456789012:model/x"},
     "modelPackageVersionArn", "regular expression pattern"),
    ("framework enum", {"InputConfig": {"S3Uri": "s3://b/m.tar.gz", "Framework": "CAFFE"}},
     "inputConfig.framework", "enum value set: [TENSORFLOW, KERAS"),
    ("framework missing", {"InputConfig": {"S3Uri": "s3://b/m.tar.gz"}}, "inputConfig.framework",
     "Member must not be null"),
    ("s3 uri pattern", {"InputConfig": {"S3Uri": "ftp://b/m.tar.gz", "Framework": "ONNX"}}, "inputConfig.s3Uri",
     "regular expression pattern"),
    ("data input empty", {"InputConfig": {"S3Uri": "s3://b/m.tar.gz", "Framework": "ONNX", "DataInputConfig": ""}},
     "inputConfig.dataInputConfig", "length greater than or equal to 1"),
    ("data input too long", {"InputConfig": {"S3Uri": "s3://b/m.tar.gz", "Framework": "ONNX",
                                             "DataInputConfig": "x" * 16385}},
     "inputConfig.dataInputConfig", "length less than or equal to 16384"),
    ("framework version pattern", {"InputConfig": {"S3Uri": "s3://b/m.tar.gz", "Framework": "PYTORCH",
                                                   "FrameworkVersion": "latest"}},
     "inputConfig.frameworkVersion", "regular expression pattern"),
    ("output missing", {"OutputConfig": None}, "outputConfig", "Member must not be null"),
    ("output location missing", {"OutputConfig": {"TargetDevice": "ml_c4"}}, "outputConfig.s3OutputLocation",
     "Member must not be null"),
    ("target device enum", {"OutputConfig": {"S3OutputLocation": "s3://b/o", "TargetDevice": "ml_c9"}},
     "outputConfig.targetDevice", "enum value set"),
    ("platform os enum", {"OutputConfig": {"S3OutputLocation": "s3://b/o",
                                           "TargetPlatform": {"Os": "WINDOWS", "Arch": "X86_64"}}},
     "outputConfig.targetPlatform.os", "enum value set: [ANDROID, LINUX]"),
    ("platform arch missing", {"OutputConfig": {"S3OutputLocation": "s3://b/o", "TargetPlatform": {"Os": "LINUX"}}},
     "outputConfig.targetPlatform.arch", "Member must not be null"),
    ("accelerator enum", {"OutputConfig": {"S3OutputLocation": "s3://b/o",
                                           "TargetPlatform": {"Os": "LINUX", "Arch": "ARM64", "Accelerator": "TPU"}}},
     "outputConfig.targetPlatform.accelerator", "enum value set"),
    ("compiler options too short", {"OutputConfig": {"S3OutputLocation": "s3://b/o", "TargetDevice": "ml_c4",
                                                     "CompilerOptions": "{}"}},
     "outputConfig.compilerOptions", "length greater than or equal to 3"),
    ("kms key pattern", {"OutputConfig": {"S3OutputLocation": "s3://b/o", "TargetDevice": "ml_c4",
                                          "KmsKeyId": "key with spaces"}},
     "outputConfig.kmsKeyId", "regular expression pattern"),
    ("stopping missing", {"StoppingCondition": None}, "stoppingCondition", "Member must not be null"),
    ("runtime zero", {"StoppingCondition": {"MaxRuntimeInSeconds": 0}}, "stoppingCondition.maxRuntimeInSeconds",
     "value greater than or equal to 1"),
    ("runtime string", {"StoppingCondition": {"MaxRuntimeInSeconds": "600"}},
     "stoppingCondition.maxRuntimeInSeconds", "Member must be an integer"),
    ("runtime bool", {"StoppingCondition": {"MaxRuntimeInSeconds": True}},
     "stoppingCondition.maxRuntimeInSeconds", "Member must be an integer"),
    ("runtime float", {"StoppingCondition": {"MaxRuntimeInSeconds": 1.5}},
     "stoppingCondition.maxRuntimeInSeconds", "Member must be an integer"),
    ("pending too short", {"StoppingCondition": {"MaxPendingTimeInSeconds": 60}},
     "stoppingCondition.maxPendingTimeInSeconds", "value greater than or equal to 1800"),
    ("pending too long", {"StoppingCondition": {"MaxPendingTimeInSeconds": 2419201}},
     "stoppingCondition.maxPendingTimeInSeconds", "value less than or equal to 2419200"),
    ("wait zero", {"StoppingCondition": {"MaxWaitTimeInSeconds": 0}}, "stoppingCondition.maxWaitTimeInSeconds",
     "value greater than or equal to 1"),
    ("vpc subnets empty", {"VpcConfig": {"SecurityGroupIds": ["sg-1"], "Subnets": []}}, "vpcConfig.subnets",
     "length greater than or equal to 1"),
    ("vpc too many groups", {"VpcConfig": {"SecurityGroupIds": [f"sg-{i}" for i in range(6)], "Subnets": ["s-1"]}},
     "vpcConfig.securityGroupIds", "length less than or equal to 5"),
    ("vpc group pattern", {"VpcConfig": {"SecurityGroupIds": ["sg_1"], "Subnets": ["s-1"]}},
     "vpcConfig.securityGroupIds.1.member", "regular expression pattern"),
    ("vpc subnets not a list", {"VpcConfig": {"SecurityGroupIds": ["sg-1"], "Subnets": "s-1"}},
     "vpcConfig.subnets", "Member must be a list"),
    ("too many tags", {"Tags": [{"Key": f"k{i}", "Value": "v"} for i in range(51)]}, "tags",
     "length less than or equal to 50"),
    ("tag key empty", {"Tags": [{"Key": "", "Value": "v"}]}, "tags.1.member.key", "length greater than or equal to 1"),
    ("tag key too long", {"Tags": [{"Key": "k" * 129, "Value": "v"}]}, "tags.1.member.key",
     "length less than or equal to 128"),
    ("tag key pattern", {"Tags": [{"Key": "ok", "Value": "v"}, {"Key": "semi;colon", "Value": "v"}]},
     "tags.2.member.key", "regular expression pattern"),
    ("tag value missing", {"Tags": [{"Key": "k"}]}, "tags.1.member.value", "Member must not be null"),
    ("tag value too long", {"Tags": [{"Key": "k", "Value": "v" * 257}]}, "tags.1.member.value",
     "length less than or equal to 256"),
    ("input config not an object", {"InputConfig": "s3://b/m.tar.gz"}, "inputConfig", "Member must be an object"),
]


@pytest.mark.parametrize(("overrides", "member", "constraint"), [c[1:] for c in CREATE_CASES],
                         ids=[c[0] for c in CREATE_CASES])
def test_create_structural_errors_name_member_and_constraint(overrides: dict[str, Any], member: str,
                                                             constraint: str) -> None:
    # GIVEN a CreateCompilationJob request breaking one constraint of botocore's model
    request = create_request(**overrides)
    request = {k: v for k, v in request.items() if v is not None}
    # WHEN it is validated
    message = invalid("CreateCompilationJob", request)
    # THEN one error names the member path and the constraint
    assert re.match(r"[12] validation errors? detected: ", message), message
    assert f"at '{member}' failed to satisfy constraint: {constraint}" in message or (
        f"at '{member}' failed to satisfy constraint" in message and constraint in message)


def test_required_members_are_reported_together() -> None:
    # GIVEN an empty CreateCompilationJob request
    # WHEN it is validated
    message = invalid("CreateCompilationJob", {})
    # THEN every required member is listed in one message
    assert message.startswith("4 validation errors detected: ")
    for member in ("compilationJobName", "roleArn", "outputConfig", "stoppingCondition"):
        assert f"Value null at '{member}' failed to satisfy constraint: Member must not be null" in message


def test_unknown_members_are_refused_with_their_place() -> None:
    # GIVEN unknown members at the top level and inside OutputConfig
    request = create_request(Bogus=1)
    request["OutputConfig"]["TargetDevise"] = "ml_c4"
    # WHEN it is validated
    message = invalid("CreateCompilationJob", request)
    # THEN both are named, with where they are and what is valid
    assert message.startswith("2 validation errors detected: ")
    assert "Unknown member 'Bogus'" in message and "CompilationJobName" in message
    assert "Unknown member 'TargetDevise' at 'outputConfig'" in message and "TargetDevice" in message


def test_body_must_be_an_object() -> None:
    # GIVEN a JSON list instead of an object / WHEN validated / THEN it is refused
    assert "JSON object" in invalid("ListCompilationJobs", [1, 2])


@pytest.mark.parametrize(("operation", "params", "member", "constraint"), [
    ("DescribeCompilationJob", {"CompilationJobName": "has space"}, "compilationJobName", "pattern"),
    ("DescribeCompilationJob", {}, "compilationJobName", "must not be null"),
    ("StopCompilationJob", {"CompilationJobName": "-leading"}, "compilationJobName", "pattern"),
    ("DeleteCompilationJob", {"CompilationJobName": "x" * 64}, "compilationJobName", "63"),
    ("ListCompilationJobs", {"MaxResults": 0}, "maxResults", "greater than or equal to 1"),
    ("ListCompilationJobs", {"MaxResults": 101}, "maxResults", "less than or equal to 100"),
    ("ListCompilationJobs", {"MaxResults": "10"}, "maxResults", "Member must be an integer"),
    ("ListCompilationJobs", {"SortBy": "Size"}, "sortBy", "enum value set: [Name, CreationTime, Status]"),
    ("ListCompilationJobs", {"SortOrder": "Up"}, "sortOrder", "enum value set: [Ascending, Descending]"),
    ("ListCompilationJobs", {"StatusEquals": "RUNNING"}, "statusEquals", "enum value set"),
    ("ListCompilationJobs", {"NameContains": "under_score"}, "nameContains", "pattern"),
    ("ListCompilationJobs", {"NameContains": "n" * 64}, "nameContains", "63"),
    ("ListCompilationJobs", {"CreationTimeAfter": "yesterday"}, "creationTimeAfter", "timestamp"),
    ("ListCompilationJobs", {"LastModifiedTimeBefore": True}, "lastModifiedTimeBefore", "timestamp"),
    ("ListCompilationJobs", {"NextToken": "t" * 8193}, "nextToken", "8192"),
    ("AddTags", {"ResourceArn": "arn:aws:s3:::bucket", "Tags": []}, "resourceArn", "pattern"),
    ("AddTags", {"ResourceArn": ARN}, "tags", "must not be null"),
    ("AddTags", {"ResourceArn": ARN, "Tags": [{"Key": "k" * 129, "Value": "v"}]}, "tags.1.member.key", "128"),
    ("ListTags", {"ResourceArn": ARN, "MaxResults": 10}, "maxResults", "greater than or equal to 50"),
    ("ListTags", {}, "resourceArn", "must not be null"),
    ("DeleteTags", {"ResourceArn": ARN, "TagKeys": []}, "tagKeys", "greater than or equal to 1"),
    ("DeleteTags", {"ResourceArn": ARN, "TagKeys": [f"k{i}" for i in range(51)]}, "tagKeys", "50"),
    ("DeleteTags", {"ResourceArn": ARN, "TagKeys": ["ok", ""]}, "tagKeys.2.member", "greater than or equal to 1"),
])
def test_other_operations_validate_from_the_model(operation: str, params: dict[str, Any], member: str,
                                                  constraint: str) -> None:
    # GIVEN a request breaking one constraint of the operation's input shape
    # WHEN it is validated
    message = invalid(operation, params)
    # THEN the message names the member and the constraint
    assert f"at '{member}' failed to satisfy constraint" in message
    assert constraint in message


def test_role_arn_pattern_accepts_paths() -> None:
    # GIVEN a role ARN with a path (allowed by the model's pattern) / WHEN validated / THEN accepted
    contract.validate_request("CreateCompilationJob", create_request(RoleArn=ROLE.replace("role/", "role/team/")))


def test_tag_pattern_accepts_unicode_letters() -> None:
    # GIVEN a tag using \p{L} letters and spaces (Java regex classes in botocore's pattern)
    tags = [{"Key": "équipe vision", "Value": "données_2024 ü"}]
    # WHEN / THEN it is accepted
    contract.validate_request("AddTags", {"ResourceArn": ARN, "Tags": tags})


@pytest.mark.parametrize(("value", "expected"), [
    (1700000000, 1700000000.0),
    (1700000000.5, 1700000000.5),
    ("1700000000", 1700000000.0),
    ("2023-11-14T22:13:20Z", 1700000000.0),
    ("2023-11-14T22:13:20+00:00", 1700000000.0),
    ("2023-11-14T22:13:20", 1700000000.0),
    ("not a time", None),
    (True, None),
    (None, None),
])
def test_parse_timestamp(value: Any, expected: float | None) -> None:
    # GIVEN a JSON-protocol timestamp in one of its forms / WHEN parsed / THEN epoch seconds (or None)
    assert contract.parse_timestamp(value) == expected


def test_shape_output_keeps_only_wire_members() -> None:
    # GIVEN an internal record with store-only attributes and None values
    record = {"CompilationJobName": "j", "CompilationJobArn": ARN, "Partition": "job", "ExecutionArn": "x",
              "FailureReason": None, "OutputConfig": {"TargetDevice": "ml_c4", "Secret": "s"},
              "CreationTime": dt.datetime(2024, 1, 1).timestamp()}
    # WHEN it is shaped for DescribeCompilationJob
    shaped = contract.shape_output("DescribeCompilationJob", record)
    # THEN internal members, unknown nested members and None values are dropped
    assert shaped == {"CompilationJobName": "j", "CompilationJobArn": ARN, "OutputConfig": {"TargetDevice": "ml_c4"},
                      "CreationTime": record["CreationTime"]}
