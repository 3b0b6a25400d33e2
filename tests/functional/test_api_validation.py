"""Every validation rule through a real botocore client against ``kiln serve`` (error code + member named)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError, ParamValidationError

ARN = "arn:aws:sagemaker:us-east-1:123456789012:compilation-job/nope"


def assert_validation(call: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response["Error"]
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Code"] == "ValidationException", error
    for fragment in fragments:
        assert fragment in error["Message"], error["Message"]
    return str(error["Message"])


def _input(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"S3Uri": "s3://kiln-local-models/v/model.tar.gz", "Framework": "ONNX",
                            "DataInputConfig": '{"x": [1, 8]}'}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def _output(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"S3OutputLocation": "s3://kiln-local-artifacts/v", "TargetDevice": "ml_c4"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


# (id, overrides of the valid request, member named, other fragment)
CREATE_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("name-pattern", {"CompilationJobName": "a_b"}, "compilationJobName", "regular expression pattern"),
    ("name-length", {"CompilationJobName": "n" * 64}, "compilationJobName", "less than or equal to 63"),
    ("role-pattern", {"RoleArn": "arn:aws:iam::123456789012:user/someone"}, "roleArn", "regular expression"),
    ("role-missing", {"RoleArn": None}, "roleArn", "must not be null"),
    ("output-missing", {"OutputConfig": None}, "outputConfig", "must not be null"),
    ("stopping-missing", {"StoppingCondition": None}, "stoppingCondition", "must not be null"),
    ("framework-enum", {"InputConfig": _input(Framework="CAFFE")}, "inputConfig.framework", "enum value set"),
    ("s3uri-pattern", {"InputConfig": _input(S3Uri="ftp://bucket/model.tar.gz")}, "inputConfig.s3Uri",
     "regular expression"),
    ("s3uri-not-tar-gz", {"InputConfig": _input(S3Uri="s3://kiln-local-models/v/model.zip")}, "inputConfig.s3Uri",
     ".tar.gz"),
    ("s3uri-https", {"InputConfig": _input(S3Uri="https://kiln-local-models.s3.amazonaws.com/m.tar.gz")},
     "inputConfig.s3Uri", "s3://bucket/key.tar.gz"),
    ("data-input-not-json", {"InputConfig": _input(DataInputConfig="{x: [1, 8]")}, "inputConfig.dataInputConfig",
     "JSON object"),
    ("data-input-list-for-onnx", {"InputConfig": _input(DataInputConfig="[[1, 8]]")},
     "inputConfig.dataInputConfig", "only for PYTORCH"),
    ("data-input-bad-shape", {"InputConfig": _input(DataInputConfig='{"x": [1, 0]}')},
     "inputConfig.dataInputConfig", "positive integers"),
    ("data-input-empty", {"InputConfig": _input(DataInputConfig="")}, "inputConfig.dataInputConfig",
     "greater than or equal to 1"),
    ("data-input-terabytes", {"InputConfig": _input(DataInputConfig='{"x": [1000000, 1000000]}')},
     "inputConfig.dataInputConfig.x", "takes 4000000000000 bytes as float32"),
    ("options-allow-pickle-onnx", {"OutputConfig": _output(CompilerOptions='{"allow_pickle": true}')},
     "outputConfig.compilerOptions", "applies only to SKLEARN, XGBOOST, PYTORCH"),
    ("framework-version-onnx", {"InputConfig": _input(FrameworkVersion="1.1")}, "inputConfig.frameworkVersion",
     "only supported for"),
    ("framework-version-pattern", {"InputConfig": _input(Framework="PYTORCH", FrameworkVersion="v2")},
     "inputConfig.frameworkVersion", "regular expression"),
    ("framework-target", {"InputConfig": _input(Framework="ONNX"), "OutputConfig": _output(TargetDevice="coreml")},
     "inputConfig.framework", "'coreml' supports TENSORFLOW, KERAS, PYTORCH"),
    ("device-enum", {"OutputConfig": _output(TargetDevice="ml_c99")}, "outputConfig.targetDevice", "enum value set"),
    ("device-inf1", {"OutputConfig": _output(TargetDevice="ml_inf1")}, "outputConfig.targetDevice",
     "Target 'ml_inf1' is not supported by this deployment"),
    ("device-inf2", {"OutputConfig": _output(TargetDevice="ml_inf2")}, "outputConfig.targetDevice", "Supported: "),
    ("device-trn1", {"OutputConfig": _output(TargetDevice="ml_trn1")}, "outputConfig.targetDevice", "Neuron"),
    ("device-eia2", {"OutputConfig": _output(TargetDevice="ml_eia2")}, "outputConfig.targetDevice",
     "Elastic Inference"),
    ("device-qcs605", {"OutputConfig": _output(TargetDevice="qcs605")}, "outputConfig.targetDevice", "Hexagon"),
    ("device-amba", {"OutputConfig": _output(TargetDevice="amba_cv22")}, "outputConfig.targetDevice", "Ambarella"),
    ("platform-android", {"OutputConfig": _output(TargetDevice=None,
                                                  TargetPlatform={"Os": "ANDROID", "Arch": "ARM_EABI"},
                                                  CompilerOptions="{'ANDROID_PLATFORM': 25, 'mattr': ['+neon']}")},
     "outputConfig.targetPlatform", "ANDROID targets need the Android NDK"),
    ("platform-mali", {"OutputConfig": _output(TargetDevice=None,
                                               TargetPlatform={"Os": "LINUX", "Arch": "ARM64", "Accelerator": "MALI"})},
     "outputConfig.targetPlatform", "MALI accelerator is not supported"),
    ("platform-os-enum", {"OutputConfig": _output(TargetDevice=None,
                                                  TargetPlatform={"Os": "WINDOWS", "Arch": "X86_64"})},
     "outputConfig.targetPlatform.os", "enum value set"),
    ("platform-arch-missing", {"OutputConfig": _output(TargetDevice=None, TargetPlatform={"Os": "LINUX"})},
     "outputConfig.targetPlatform.arch", "must not be null"),
    ("device-and-platform", {"OutputConfig": _output(TargetPlatform={"Os": "LINUX", "Arch": "X86_64"})},
     "outputConfig.targetDevice", "outputConfig.targetPlatform"),
    ("neither-device-nor-platform", {"OutputConfig": _output(TargetDevice=None)}, "outputConfig.targetDevice",
     "Exactly one of"),
    ("input-and-package", {"ModelPackageVersionArn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/p/1"},
     "modelPackageVersionArn", "inputConfig"),
    ("neither-input-nor-package", {"InputConfig": None}, "modelPackageVersionArn", "Exactly one of"),
    ("output-location", {"OutputConfig": _output(S3OutputLocation="https://bucket.example.com/out")},
     "outputConfig.s3OutputLocation", "S3 URI"),
    ("options-not-json", {"OutputConfig": _output(CompilerOptions="mcpu=haswell")}, "outputConfig.compilerOptions",
     "JSON object"),
    ("options-bf16-without-native-bf16", {"OutputConfig": _output(TargetDevice="ml_c5",
                                                                 CompilerOptions='{"precision": "bf16"}')},
     "outputConfig.compilerOptions", "no native bf16 arithmetic"),
    ("quantize-dtype", {"OutputConfig": _output(CompilerOptions='{"quantize": {"dtype": "fp8", "calibration": "c.npz"}}')},
     "outputConfig.compilerOptions.quantize.dtype", "must be one of int8"),
    ("quantize-calibration-escapes", {"OutputConfig": _output(
        CompilerOptions='{"quantize": {"dtype": "int8", "calibration": "../c.npz"}}')},
     "outputConfig.compilerOptions.quantize.calibration", "no '..'"),
    ("quantize-unknown-member", {"OutputConfig": _output(
        CompilerOptions='{"quantize": {"dtype": "int8", "calibration": "c.npz", "per_channel": false}}')},
     "outputConfig.compilerOptions.quantize", "per_channel"),
    ("quantize-and-bf16", {"OutputConfig": _output(TargetDevice="ml_c5", CompilerOptions=(
        '{"quantize": {"dtype": "int8", "calibration": "s3://kiln-local-models/c.npz"}, "precision": "bf16", '
        '"mcpu": "znver4"}'))}, "outputConfig.compilerOptions.quantize", "mutually exclusive"),
    ("quantize-gpu-target", {"OutputConfig": _output(TargetDevice="ml_g4dn", CompilerOptions=(
        '{"quantize": {"dtype": "int8", "calibration": "c.npz"}}'))}, "outputConfig.compilerOptions.quantize",
     "no int8 path"),
    ("quantize-pytorch", {"InputConfig": _input(Framework="PYTORCH", DataInputConfig='{"x": [1, 8]}'),
                          "OutputConfig": _output(CompilerOptions='{"quantize": {"dtype": "int8", "calibration": "c.npz"}}')},
     "outputConfig.compilerOptions.quantize", "not PYTORCH"),
    ("options-unknown", {"OutputConfig": _output(CompilerOptions='{"opt_level": 3}')},
     "outputConfig.compilerOptions", "opt_level"),
    ("options-gpu-on-cpu", {"OutputConfig": _output(CompilerOptions="{'gpu-code': 'sm_72'}")},
     "outputConfig.compilerOptions", "only to NVIDIA targets"),
    ("options-nvidia-needs-gpu-code", {"OutputConfig": _output(
        TargetDevice=None, TargetPlatform={"Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"},
        CompilerOptions="{'mcpu': 'skylake-avx512'}")}, "outputConfig.compilerOptions", "gpu-code"),
    ("device-gpu-cuda13-dropped", {"OutputConfig": _output(TargetDevice="ml_p3")}, "outputConfig.targetDevice",
     "has a sm_70 GPU"),
    ("options-gpu-code-cuda13-dropped", {"OutputConfig": _output(
        TargetDevice=None, TargetPlatform={"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"},
        CompilerOptions='{"gpu-code": "sm_72"}')}, "outputConfig.compilerOptions", "CUDA 13.0's NVRTC"),
    ("options-too-short", {"OutputConfig": _output(CompilerOptions="{}")}, "outputConfig.compilerOptions",
     "greater than or equal to 3"),
    ("kms-pattern", {"OutputConfig": _output(KmsKeyId="not a key!")}, "outputConfig.kmsKeyId", "regular expression"),
    ("runtime-zero", {"StoppingCondition": {"MaxRuntimeInSeconds": 0}}, "stoppingCondition.maxRuntimeInSeconds",
     "greater than or equal to 1"),
    ("runtime-string", {"StoppingCondition": {"MaxRuntimeInSeconds": "ten"}},
     "stoppingCondition.maxRuntimeInSeconds", "integer"),
    ("pending-too-short", {"StoppingCondition": {"MaxPendingTimeInSeconds": 60}},
     "stoppingCondition.maxPendingTimeInSeconds", "greater than or equal to 1800"),
    ("wait-below-runtime", {"StoppingCondition": {"MaxRuntimeInSeconds": 900, "MaxWaitTimeInSeconds": 300}},
     "stoppingCondition.maxWaitTimeInSeconds", "MaxRuntimeInSeconds"),
    ("vpc-subnets-empty", {"VpcConfig": {"SecurityGroupIds": ["sg-1"], "Subnets": []}}, "vpcConfig.subnets",
     "greater than or equal to 1"),
    ("vpc-group-pattern", {"VpcConfig": {"SecurityGroupIds": ["sg_1!"], "Subnets": ["subnet-1"]}},
     "vpcConfig.securityGroupIds.1.member", "regular expression"),
    ("tags-too-many", {"Tags": [{"Key": f"k{i}", "Value": "v"} for i in range(51)]}, "tags",
     "less than or equal to 50"),
    ("tag-key-long", {"Tags": [{"Key": "k" * 129, "Value": "v"}]}, "tags.1.member.key", "128"),
    ("tag-key-duplicate", {"Tags": [{"Key": "team", "Value": "a"}, {"Key": "team", "Value": "b"}]},
     "tags.2.member.key", "unique"),
    ("tag-key-reserved", {"Tags": [{"Key": "aws:owner", "Value": "x"}]}, "tags.1.member.key", "reserved"),
    ("tag-value-missing", {"Tags": [{"Key": "k"}]}, "tags.1.member.value", "must not be null"),
]


@pytest.mark.parametrize(("overrides", "member", "fragment"), [c[1:] for c in CREATE_CASES],
                         ids=[c[0] for c in CREATE_CASES])
def test_create_validation_rules(raw_sagemaker: Any, job_request: Callable[..., dict[str, Any]],
                                 unique: Callable[[str], str], overrides: dict[str, Any], member: str,
                                 fragment: str) -> None:
    # GIVEN a CreateCompilationJob request breaking one rule (botocore's client-side checks off)
    request = job_request(unique("val"))
    request.update(overrides)
    request = {k: v for k, v in request.items() if v is not None}
    # WHEN it is sent to Kiln
    message = assert_validation(lambda: raw_sagemaker.create_compilation_job(**request), member, fragment)
    # THEN the message is SageMaker-style and no job was created
    assert re.match(r"\d+ validation errors? detected: ", message), message
    if "CompilationJobName" in request and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}",
                                                        str(request["CompilationJobName"])):
        with pytest.raises(ClientError) as missing:
            raw_sagemaker.describe_compilation_job(CompilationJobName=request["CompilationJobName"])
        assert missing.value.response["Error"]["Code"] == "ResourceNotFound"


def test_exact_sagemaker_message_with_the_stock_client(sagemaker: Any, job_request: Callable[..., Any]) -> None:
    # GIVEN a stock boto3 client (botocore does not check patterns client-side)
    # WHEN a job named 'a_b' is created
    message = assert_validation(lambda: sagemaker.create_compilation_job(**job_request("a_b")))
    # THEN Kiln answers exactly as SageMaker does
    assert message == ("1 validation error detected: Value 'a_b' at 'compilationJobName' failed to satisfy "
                       "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


@pytest.mark.parametrize(("overrides", "member"), [
    ({"OutputConfig": _output(TargetDevice="ml_inf1")}, "outputConfig.targetDevice"),
    ({"OutputConfig": _output(CompilerOptions="{'gpu-code': 'sm_72', 'trt-ver': '6.0.1', 'cuda-ver': '10.1'}")},
     "outputConfig.compilerOptions"),
    ({"InputConfig": _input(DataInputConfig='{"x": "1,8"}')}, "inputConfig.dataInputConfig"),
    ({"InputConfig": _input(S3Uri="s3://kiln-local-models/v/model.onnx")}, "inputConfig.s3Uri"),
    ({"StoppingCondition": {"MaxRuntimeInSeconds": 600, "MaxWaitTimeInSeconds": 60}},
     "stoppingCondition.maxWaitTimeInSeconds"),
    ({"Tags": [{"Key": "aws:cost", "Value": "x"}]}, "tags.1.member.key"),
])
def test_server_side_rules_with_the_stock_client(sagemaker: Any, job_request: Callable[..., Any],
                                                 unique: Callable[[str], str], overrides: dict[str, Any],
                                                 member: str) -> None:
    # GIVEN a request that botocore accepts client-side but breaks a Kiln rule
    request = {**job_request(unique("stock")), **overrides}
    # WHEN it is sent with the stock client / THEN ValidationException names the member
    assert_validation(lambda: sagemaker.create_compilation_job(**request), member)


def test_stock_client_checks_required_members_before_sending(sagemaker: Any, job_request: Callable[..., Any]) -> None:
    # GIVEN a request missing RoleArn
    request = job_request("no-role")
    del request["RoleArn"]
    # WHEN sent with the stock client / THEN botocore itself refuses (Kiln's model agrees: see the raw case)
    with pytest.raises(ParamValidationError, match="RoleArn"):
        sagemaker.create_compilation_job(**request)


@pytest.mark.parametrize(("target", "body", "member", "fragment"), [
    ("Unknown", {"CompilationJobName": "x", "Bogus": True}, "Bogus", "Unknown member"),
    ("Unknown", {"CompilationJobName": "x", "OutputConfig": {"S3OutputLocation": "s3://b/o", "Target": "ml_c4"}},
     "'Target' at 'outputConfig'", "valid members are"),
])
def test_unknown_members_are_refused(amz_json: Callable[..., Any], job_request: Callable[..., Any],
                                     unique: Callable[[str], str], target: str, body: dict[str, Any], member: str,
                                     fragment: str) -> None:
    # GIVEN a create request with an unknown member (botocore cannot even serialize it, so raw JSON 1.1)
    request = {**job_request(unique("unk")), **body}
    # WHEN it is posted
    status, _, payload = amz_json("SageMaker.CreateCompilationJob", request)
    # THEN HTTP 400 ValidationException naming the member
    assert status == 400
    assert payload["__type"] == "ValidationException"
    assert member in payload["message"] and fragment in payload["message"]


@pytest.mark.parametrize(("operation", "params", "member"), [
    ("describe_compilation_job", {"CompilationJobName": "bad_name"}, "compilationJobName"),
    ("describe_compilation_job", {"CompilationJobName": "x" * 64}, "compilationJobName"),
    ("stop_compilation_job", {"CompilationJobName": "bad name"}, "compilationJobName"),
    ("delete_compilation_job", {"CompilationJobName": "-bad"}, "compilationJobName"),
    ("list_compilation_jobs", {"MaxResults": 0}, "maxResults"),
    ("list_compilation_jobs", {"MaxResults": 101}, "maxResults"),
    ("list_compilation_jobs", {"SortBy": "Size"}, "sortBy"),
    ("list_compilation_jobs", {"SortOrder": "Sideways"}, "sortOrder"),
    ("list_compilation_jobs", {"StatusEquals": "RUNNING"}, "statusEquals"),
    ("list_compilation_jobs", {"NameContains": "has_underscore"}, "nameContains"),
    ("list_compilation_jobs", {"NextToken": "forged.token"}, "NextToken"),
    ("add_tags", {"ResourceArn": "arn:aws:s3:::bucket", "Tags": [{"Key": "k", "Value": "v"}]}, "resourceArn"),
    ("add_tags", {"ResourceArn": ARN, "Tags": [{"Key": "aws:x", "Value": "v"}]}, "tags.1.member.key"),
    ("add_tags", {"ResourceArn": ARN, "Tags": [{"Key": "k" * 129, "Value": "v"}]}, "tags.1.member.key"),
    ("add_tags", {"ResourceArn": "arn:aws:sagemaker:us-east-1:123456789012:model/m",
                  "Tags": [{"Key": "k", "Value": "v"}]}, "resourceArn"),
    ("list_tags", {"ResourceArn": ARN, "MaxResults": 5}, "maxResults"),
    ("list_tags", {"ResourceArn": "not-an-arn"}, "resourceArn"),
    ("delete_tags", {"ResourceArn": ARN, "TagKeys": []}, "tagKeys"),
    ("delete_tags", {"ResourceArn": ARN, "TagKeys": [f"k{i}" for i in range(51)]}, "tagKeys"),
])
def test_other_operations_validation(raw_sagemaker: Any, operation: str, params: dict[str, Any],
                                     member: str) -> None:
    # GIVEN a request breaking one constraint of another operation
    # WHEN it is sent to Kiln / THEN ValidationException names the member
    assert_validation(lambda: getattr(raw_sagemaker, operation)(**params), member)


def test_list_with_stock_client_reaches_server_range_checks(sagemaker: Any) -> None:
    # GIVEN the stock client (it checks MaxResults' minimum but not its maximum)
    # WHEN MaxResults is 101 / THEN Kiln refuses it naming the member
    assert_validation(lambda: sagemaker.list_compilation_jobs(MaxResults=101), "maxResults",
                      "less than or equal to 100")


@pytest.mark.parametrize(("target", "raw", "code", "fragment"), [
    ("SageMaker.CreateTrainingJob", b"{}", "UnknownOperationException", "CreateTrainingJob is not supported"),
    ("SageMaker.ListCompilationJobz", b"{}", "UnknownOperationException", "supported: CreateCompilationJob"),
    (None, b"{}", "UnknownOperationException", "X-Amz-Target"),
    ("DynamoDB_20120810.ListTables", b"{}", "UnknownOperationException", "SageMaker.<Operation>"),
    ("SageMaker.ListCompilationJobs", b"{not json", "SerializationException", "not valid JSON"),
    ("SageMaker.ListCompilationJobs", b"[1, 2]", "SerializationException", "JSON object"),
    ("SageMaker.ListCompilationJobs", b"\"text\"", "SerializationException", "JSON object"),
    ("SageMaker.CreateCompilationJob", b"{\"CompilationJobName\": ", "SerializationException", "not valid JSON"),
])
def test_unknown_operations_and_malformed_json(amz_json: Callable[..., Any], target: str | None, raw: bytes,
                                               code: str, fragment: str) -> None:
    # GIVEN a raw JSON 1.1 request with an unknown operation or a body that is not a JSON object
    # WHEN it is posted
    status, headers, payload = amz_json(target, raw=raw)
    # THEN HTTP 400 with a clear __type and message, in the JSON 1.1 content type
    assert status == 400
    assert headers["Content-Type"].startswith("application/x-amz-json-1.1")
    assert payload["__type"] == code
    assert fragment in payload["message"]


def test_unknown_operation_through_botocore_is_a_client_error(api_server: Any) -> None:
    # GIVEN a stock client of another SageMaker operation Kiln does not serve
    import boto3

    client = boto3.client("sagemaker", endpoint_url=api_server.url, region_name="us-east-1",
                          aws_access_key_id="t", aws_secret_access_key="t")
    # WHEN it is called
    with pytest.raises(ClientError) as info:
        client.list_training_jobs()
    # THEN botocore raises ClientError with Kiln's code
    assert info.value.response["Error"]["Code"] == "UnknownOperationException"
    assert "ListTrainingJobs" in info.value.response["Error"]["Message"]
