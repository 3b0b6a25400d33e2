"""Lambda entrypoint of the model registry hook (EventBridge rules: see ``kiln.registry``)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from kiln import wiring
from kiln.events import DETAIL_TYPE as JOB_DETAIL_TYPE
from kiln.events import EVENT_SOURCE as JOB_EVENT_SOURCE
from kiln.registry import PACKAGE_DETAIL_TYPE, PACKAGE_EVENT_SOURCE

logger = Logger(service="kiln-registry")
wiring.start_in_lambda()


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Model package state change -> compile on approval; Kiln job state change -> write back."""
    source, detail_type = event.get("source"), event.get("detail-type")
    logger.append_keys(event_source=source, event_id=event.get("id"))
    if source == PACKAGE_EVENT_SOURCE and detail_type == PACKAGE_DETAIL_TYPE:
        summary = wiring.current().registry_hook.on_model_package_event(event)
    elif source == JOB_EVENT_SOURCE and detail_type == JOB_DETAIL_TYPE:
        summary = wiring.current().registry_hook.on_job_state_change(event)
    else:
        logger.info("ignoring an event the registry hook does not handle", detail_type=detail_type)
        return {"ignored": f"{source} / {detail_type}"}
    logger.info("registry event handled", summary=summary)
    return summary
