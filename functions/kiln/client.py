"""A stock boto3 SageMaker client for a deployed Kiln (API Gateway with IAM authorization).

API Gateway verifies SigV4 signatures for the service ``execute-api``, not ``sagemaker``; this
client signs for it, and is otherwise the unchanged boto3 client::

    from kiln.client import sagemaker_client
    sm = sagemaker_client("https://abc123.execute-api.eu-west-1.amazonaws.com/prod")
    sm.list_compilation_jobs()
"""

from __future__ import annotations

from typing import Any

import boto3

SIGNING_NAME = "execute-api"


def _sign_for_execute_api(request: Any, **_: Any) -> None:
    request.context.setdefault("signing", {})["signing_name"] = SIGNING_NAME


def sagemaker_client(endpoint_url: str, *, region_name: str | None = None,
                     session: boto3.session.Session | None = None, **kwargs: Any) -> Any:
    """``boto3.client("sagemaker")`` for Kiln at ``endpoint_url``, SigV4-signed for execute-api."""
    session = session or boto3.session.Session()
    # The API's own URL says where it lives; it wins over the session's default region.
    region = region_name or region_from_url(endpoint_url) or session.region_name or "us-east-1"
    client = session.client("sagemaker", endpoint_url=endpoint_url, region_name=region, **kwargs)
    client.meta.events.register("before-sign.sagemaker", _sign_for_execute_api)
    return client


def region_from_url(url: str) -> str | None:
    """The region in an execute-api URL, or None."""
    # https://{api-id}.execute-api.{region}.amazonaws.com/{stage}
    host = url.split("//", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[1] == "execute-api":
        return parts[2]
    return None
