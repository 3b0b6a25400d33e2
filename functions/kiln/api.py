"""The HTTP API: SageMaker's JSON 1.1 protocol on ``POST /`` and REST routes, one resolver.

Errors are mapped to the wire in one place (:func:`_kiln_error`): ``{"__type", "message"}``
with HTTP 400 for the caller's errors, so botocore raises ``ClientError`` with the right code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

from kiln.contract import OPERATIONS, validate_request
from kiln.errors import (
    KilnError,
    RequestTooLarge,
    SerializationError,
    UnknownOperation,
    ValidationError,
    wire_error,
)
from kiln.service import CompilationJobService

log = logging.getLogger(__name__)

JSON_11 = "application/x-amz-json-1.1"
TARGET_PREFIX = "SageMaker."
# The deepest request SageMaker's shapes allow is a few levels; anything far deeper is not a request.
MAX_JSON_DEPTH = 64
# API Gateway accepts 10 MB; Kiln's largest valid request is a few tens of KiB.
MAX_BODY_BYTES = 1024 * 1024


def parse_body(raw: str | None) -> Any:
    """The request body as JSON (empty -> ``{}``); ``SerializationError`` when it is not JSON, too deep
    or too large (never a ``RecursionError``: nesting is measured without recursion)."""
    if raw is None or raw == "":
        return {}
    if len(raw) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"The request body is {len(raw)} characters; at most {MAX_BODY_BYTES} are accepted")
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SerializationError(f"The request body is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    except RecursionError:
        parsed = None
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = _depth(parsed)
    if depth > MAX_JSON_DEPTH:
        raise SerializationError(f"The request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    return parsed


def _depth(document: Any) -> int:
    """How deep arrays and objects nest in ``document`` (iterative; stops counting past the limit)."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest


def _json_response(status: int, body: dict[str, Any], content_type: str = JSON_11) -> Response:
    return Response(status_code=status, content_type=content_type, body=json.dumps(body, default=str))


def build_resolver(service_factory: Callable[[], CompilationJobService]) -> APIGatewayRestResolver:
    """The resolver serving both protocols over ``service_factory()``'s service."""
    app = APIGatewayRestResolver(strip_prefixes=["/prod", "/v1"])

    def service() -> CompilationJobService:
        return service_factory()

    def caller_arn() -> str | None:
        identity = app.current_event.request_context.identity
        return identity.user_arn if identity else None

    def object_body() -> dict[str, Any]:
        parsed = parse_body(app.current_event.body)
        if not isinstance(parsed, dict):
            raise SerializationError("The request body must be a JSON object")
        return parsed

    # -- SageMaker JSON 1.1 -------------------------------------------------------------------
    dispatch: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "CreateCompilationJob": lambda r: service().create(r, caller_arn=caller_arn()),
        "DescribeCompilationJob": lambda r: service().describe(_name(r)),
        "ListCompilationJobs": lambda r: service().list(r),
        "StopCompilationJob": lambda r: _empty(service().stop, _name(r)),
        "DeleteCompilationJob": lambda r: _empty(service().delete, _name(r)),
        "AddTags": lambda r: service().add_tags(r),
        "ListTags": lambda r: service().list_tags(r),
        "DeleteTags": lambda r: service().delete_tags(r),
    }
    assert set(dispatch) == set(OPERATIONS)

    @app.post("/")
    def sagemaker_protocol() -> Response:
        target = app.current_event.get_header_value("X-Amz-Target", case_sensitive=False) or ""
        if not target.startswith(TARGET_PREFIX):
            raise UnknownOperation("Missing or invalid X-Amz-Target header; expected SageMaker.<Operation>")
        operation = target[len(TARGET_PREFIX):]
        if operation not in dispatch:
            raise UnknownOperation(f"Operation {operation} is not supported by Kiln; supported: {', '.join(OPERATIONS)}")
        request = object_body()
        validate_request(operation, request)
        return _json_response(200, dispatch[operation](request))

    # -- REST routes --------------------------------------------------------------------------
    @app.post("/compilation-jobs")
    def rest_create() -> Response:
        return _json_response(201, service().create(object_body(), caller_arn=caller_arn()), "application/json")

    @app.get("/compilation-jobs")
    def rest_list() -> Response:
        params: dict[str, Any] = dict(app.current_event.query_string_parameters or {})
        if "MaxResults" in params:
            params["MaxResults"] = _integer(params["MaxResults"], "maxResults")
        return _json_response(200, service().list(params), "application/json")

    @app.get("/compilation-jobs/<name>")
    def rest_describe(name: str) -> Response:
        return _json_response(200, service().describe(name), "application/json")

    @app.delete("/compilation-jobs/<name>")
    def rest_delete(name: str) -> Response:
        service().delete(name)
        return _json_response(200, {}, "application/json")

    @app.post("/compilation-jobs/<name>/stop")
    def rest_stop(name: str) -> Response:
        service().stop(name)
        return _json_response(200, {}, "application/json")

    def arn_of(name: str) -> str:
        return str(service().describe(name)["CompilationJobArn"])

    @app.get("/compilation-jobs/<name>/tags")
    def rest_list_tags(name: str) -> Response:
        params: dict[str, Any] = dict(app.current_event.query_string_parameters or {})
        if "MaxResults" in params:
            params["MaxResults"] = _integer(params["MaxResults"], "maxResults")
        return _json_response(200, service().list_tags({**params, "ResourceArn": arn_of(name)}), "application/json")

    @app.post("/compilation-jobs/<name>/tags")
    def rest_add_tags(name: str) -> Response:
        return _json_response(200, service().add_tags({**object_body(), "ResourceArn": arn_of(name)}),
                              "application/json")

    @app.delete("/compilation-jobs/<name>/tags")
    def rest_delete_tags(name: str) -> Response:
        keys = (app.current_event.multi_value_query_string_parameters or {}).get("TagKeys") or []
        return _json_response(200, service().delete_tags({"ResourceArn": arn_of(name), "TagKeys": keys}),
                              "application/json")

    # -- errors, in one place -----------------------------------------------------------------
    @app.exception_handler(KilnError)
    def _kiln_error(exc: KilnError) -> Response:
        status, payload = wire_error(exc)
        return _json_response(status, payload)

    @app.exception_handler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        status, payload = wire_error(exc)
        return _json_response(status, payload)

    @app.not_found
    def _not_found(exc: Exception) -> Response:
        event = app.current_event
        return _json_response(404, {"__type": "UnknownOperationException",
                                    "message": f"No route for {event.http_method} {event.path}"})

    return app


def _empty(operation: Callable[[str], None], name: str) -> dict[str, Any]:
    """Run an operation whose wire response is an empty object."""
    operation(name)
    return {}


def _name(request: dict[str, Any]) -> str:
    name = request.get("CompilationJobName")
    if not isinstance(name, str):
        raise ValidationError("1 validation error detected: Value null at 'compilationJobName' failed to satisfy "
                              "constraint: Member must not be null")
    return name


def _integer(value: str, member: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValidationError(f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
                              "constraint: Member must be an integer") from None
