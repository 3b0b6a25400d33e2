"""The REST API: IAM auth everywhere, validation, logging, throttling, and the client hint."""

from __future__ import annotations

import contextlib

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from kiln_infra.api import BOTO3_HINT, ROUTES

from .conftest import Synthesized, resolve


def test_every_api_method_requires_iam_auth(synth: Synthesized) -> None:
    # GIVEN the synthesized API methods
    methods = synth.of_type("AWS::ApiGateway::Method")
    # THEN there is one per route the API function serves, none of them open (no OPTIONS/ANY)
    assert len(methods) == sum(len(m) for m in ROUTES.values())
    assert {m["Properties"]["HttpMethod"] for m in methods.values()} <= {"GET", "POST", "DELETE"}
    # AND every one requires SigV4 (AWS_IAM)
    for name, method in methods.items():
        assert method["Properties"]["AuthorizationType"] == "AWS_IAM", name


def test_every_method_is_validated_and_proxied_to_the_api_function(synth: Synthesized) -> None:
    # GIVEN the API's request validator and its methods
    validator_id, validator = synth.one("AWS::ApiGateway::RequestValidator")
    function_id = next(k for k in synth.of_type("AWS::Lambda::Function") if k.startswith("ApiFunction"))
    # THEN the validator checks bodies and parameters
    assert validator["Properties"]["ValidateRequestBody"] is True
    assert validator["Properties"]["ValidateRequestParameters"] is True
    for name, method in synth.of_type("AWS::ApiGateway::Method").items():
        props = method["Properties"]
        # AND every method uses it and is a Lambda proxy integration of the API function
        assert props["RequestValidatorId"] == {"Ref": validator_id}, name
        assert props["Integration"]["Type"] == "AWS_PROXY", name
        assert f"<{function_id}.Arn>" in resolve(props["Integration"]["Uri"]), name


def test_sagemaker_protocol_route_requires_the_target_header(synth: Synthesized) -> None:
    # GIVEN the POST method on the root resource (the SageMaker JSON 1.1 protocol)
    root = [m for m in synth.of_type("AWS::ApiGateway::Method").values()
            if "RootResourceId" in str(m["Properties"]["ResourceId"])]
    # THEN it is the only root method and X-Amz-Target is a required header
    assert [m["Properties"]["HttpMethod"] for m in root] == ["POST"]
    assert root[0]["Properties"]["RequestParameters"] == {"method.request.header.X-Amz-Target": True}


def test_stage_logs_traces_and_throttles(synth: Synthesized) -> None:
    # GIVEN the deployed stage
    _, stage = synth.one("AWS::ApiGateway::Stage")
    props = stage["Properties"]
    # THEN it writes JSON access logs to a KMS-encrypted log group, traces with X-Ray and throttles every method
    log_group = props["AccessLogSetting"]["DestinationArn"]["Fn::GetAtt"][0]
    assert "KmsKeyId" in synth.resources[log_group]["Properties"]
    assert '"requestId"' in props["AccessLogSetting"]["Format"]
    assert props["TracingEnabled"] is True
    (settings,) = props["MethodSettings"]
    assert settings["HttpMethod"] == "*" and settings["ResourcePath"] == "/*"
    assert settings["ThrottlingRateLimit"] == 50 and settings["ThrottlingBurstLimit"] == 100
    assert settings["DataTraceEnabled"] is False


def test_gateway_errors_use_the_sagemaker_error_shape(synth: Synthesized) -> None:
    # GIVEN the gateway responses (errors API Gateway returns before the function runs)
    responses = {r["Properties"]["ResponseType"]: r["Properties"] for r in
                 synth.of_type("AWS::ApiGateway::GatewayResponse").values()}
    # THEN auth failures and throttling carry a __type, as botocore expects of the JSON 1.1 protocol
    for kind in ("ACCESS_DENIED", "MISSING_AUTHENTICATION_TOKEN", "INVALID_SIGNATURE", "THROTTLED"):
        assert '"__type"' in responses[kind]["ResponseTemplates"]["application/json"], kind


def test_outputs_give_the_url_and_a_boto3_client(synth: Synthesized) -> None:
    # GIVEN the stack outputs
    outputs = synth.template["Outputs"]
    stage_id, _ = synth.one("AWS::ApiGateway::Stage")
    # THEN the API URL (of the deployed stage) and the boto3 one-liner are there
    assert resolve(outputs["ApiUrl"]["Value"]).endswith(f".execute-api.<AWS::Region>.<AWS::URLSuffix>/<{stage_id}>/")
    assert "boto3.client(\"sagemaker\"" in resolve(outputs["Boto3Client"]["Value"])


def test_boto3_hint_signs_requests_for_api_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the client built by the output's one-liner, with credentials and no network
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    namespace: dict[str, object] = {"boto3": boto3}
    exec(BOTO3_HINT.format(url="https://abc.execute-api.eu-west-1.amazonaws.com/v1/"), namespace)
    client = namespace["c"]
    seen: dict[str, str] = {}

    def capture(request: object, **_: object) -> AWSResponse:
        seen["authorization"] = request.headers["Authorization"].decode()  # type: ignore[attr-defined]
        seen["url"] = request.url  # type: ignore[attr-defined]
        return AWSResponse(seen["url"], 200, {}, None)

    client.meta.events.register("before-send.sagemaker", capture)  # type: ignore[attr-defined]
    # WHEN it calls an operation
    with contextlib.suppress(Exception):  # the empty fake response does not parse; the request is what matters
        client.describe_compilation_job(CompilationJobName="job")  # type: ignore[attr-defined]
    # THEN the request went to the API and was signed for execute-api (not sagemaker)
    assert seen["url"].startswith("https://abc.execute-api.eu-west-1.amazonaws.com/v1/")
    assert "/eu-west-1/execute-api/aws4_request" in seen["authorization"]
