"""JobApi: the REST API in front of the API function, IAM (SigV4) auth on every method.

Routes: ``POST /`` (SageMaker JSON 1.1 protocol, ``X-Amz-Target`` required) and the REST routes
under ``/compilation-jobs``. All are Lambda proxy integrations of the one API function.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, RemovalPolicy
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from kiln_infra.config import KilnConfig
from kiln_infra.key import KilnKey
from kiln_infra.logs import encrypted_log_group

STAGE = "v1"
# (path, methods) of every route the API function serves (kiln.api.build_resolver).
ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("POST",),
    "/compilation-jobs": ("GET", "POST"),
    "/compilation-jobs/{name}": ("GET", "DELETE"),
    "/compilation-jobs/{name}/stop": ("POST",),
    "/compilation-jobs/{name}/tags": ("GET", "POST", "DELETE"),
}
JSON_CONTENT_TYPES = ("application/x-amz-json-1.1", "application/json")
# Errors API Gateway itself returns, in the SageMaker (JSON 1.1) error shape so botocore raises
# ClientError with a code: {"__type": ..., "message": ...}.
GATEWAY_ERRORS = {
    apigw.ResponseType.ACCESS_DENIED: "AccessDeniedException",
    apigw.ResponseType.MISSING_AUTHENTICATION_TOKEN: "MissingAuthenticationTokenException",
    apigw.ResponseType.INVALID_SIGNATURE: "InvalidSignatureException",
    apigw.ResponseType.EXPIRED_TOKEN: "ExpiredTokenException",
    apigw.ResponseType.UNAUTHORIZED: "UnrecognizedClientException",
    apigw.ResponseType.THROTTLED: "ThrottlingException",
    apigw.ResponseType.BAD_REQUEST_BODY: "ValidationException",
    apigw.ResponseType.BAD_REQUEST_PARAMETERS: "ValidationException",
    apigw.ResponseType.DEFAULT_5_XX: "InternalFailure",
}
BOTO3_HINT = ('c = boto3.client("sagemaker", endpoint_url="{url}"); c.meta.events.register("before-sign.sagemaker", '
              'lambda request, **_: request.context.setdefault("signing", {{}}).update(signing_name="execute-api"))')


class JobApi(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, function: lambda_.IFunction, config: KilnConfig,
                 key: KilnKey, removal_policy: RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        self.access_logs = encrypted_log_group(self, "AccessLogs", key=key.key,
                                               retention_days=config.log_retention_days,
                                               removal_policy=removal_policy)
        self.api = apigw.RestApi(
            self, "Api", rest_api_name=f"{construct_id}", description="Kiln: SageMaker compilation-job API",
            endpoint_types=[apigw.EndpointType.REGIONAL], cloud_watch_role=config.api_gateway_cloudwatch_role,
            cloud_watch_role_removal_policy=RemovalPolicy.DESTROY,
            disable_execute_api_endpoint=False,
            default_method_options=apigw.MethodOptions(authorization_type=apigw.AuthorizationType.IAM),
            deploy_options=apigw.StageOptions(
                stage_name=STAGE, tracing_enabled=True, metrics_enabled=True,
                logging_level=apigw.MethodLoggingLevel.ERROR, data_trace_enabled=False,
                throttling_rate_limit=config.throttling_rate_limit,
                throttling_burst_limit=config.throttling_burst_limit,
                access_log_destination=apigw.LogGroupLogDestination(self.access_logs),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                    caller=True, http_method=True, ip=True, protocol=True, request_time=True,
                    resource_path=True, response_length=True, status=True, user=True)))
        self.validator = self.api.add_request_validator(
            "Validator", validate_request_body=True, validate_request_parameters=True)
        body = self.api.add_model("JsonObject", content_type="application/json", model_name="JsonObject",
                                  schema=apigw.JsonSchema(schema=apigw.JsonSchemaVersion.DRAFT4,
                                                          type=apigw.JsonSchemaType.OBJECT))
        integration = apigw.LambdaIntegration(function, proxy=True, allow_test_invoke=False)
        for path, methods in ROUTES.items():
            resource = self.api.root if path == "/" else self.api.root.resource_for_path(path)
            for method in methods:
                parameters = {}
                if path == "/":
                    parameters["method.request.header.X-Amz-Target"] = True
                if "{name}" in path:
                    parameters["method.request.path.name"] = True
                models = {ct: body for ct in JSON_CONTENT_TYPES} if method == "POST" and path != "/compilation-jobs/{name}/stop" else None
                resource.add_method(method, integration, authorization_type=apigw.AuthorizationType.IAM,
                                    request_validator=self.validator, request_parameters=parameters or None,
                                    request_models=models)
        for response_type, code in GATEWAY_ERRORS.items():
            self.api.add_gateway_response(
                f"{response_type.response_type}Response", type=response_type,
                templates={"application/json": '{"__type": "' + code + '", "message": $context.error.messageString}'},
                response_headers={"x-amzn-ErrorType": f"'{code}'"})

        url = self.api.url_for_path("/")
        CfnOutput(scope, "ApiUrl", value=url, description="Kiln API endpoint (SigV4, service execute-api)")
        CfnOutput(scope, "Boto3Client", value=BOTO3_HINT.format(url=url),
                  description="A boto3 SageMaker client for Kiln (signs requests for API Gateway)")
