"""Lambda entrypoint of the HTTP API (API Gateway proxy integration)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from kiln import wiring
from kiln.api import build_resolver

logger = Logger(service="kiln-api")
tracer = Tracer(service="kiln-api")
metrics = Metrics(namespace="Kiln", service="kiln-api")
app = build_resolver(lambda: wiring.current().service)
wiring.start_in_lambda()


@logger.inject_lambda_context(correlation_id_path="requestContext.requestId")
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    response = app.resolve(event, context)
    metrics.add_metric(name="Requests", unit=MetricUnit.Count, value=1)
    if response.get("statusCode", 500) >= 500:
        metrics.add_metric(name="ServerErrors", unit=MetricUnit.Count, value=1)
    return response
