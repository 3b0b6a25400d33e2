"""Kiln's own EventBridge events: one ``Compilation Job State Change`` per status change.

Schema (documented in docs/events.md)::

    {"source": "kiln", "detail-type": "Compilation Job State Change",
     "resources": [CompilationJobArn], "detail": <DescribeCompilationJob response>}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from kiln.job_metrics import Metric, emit, outcome_metrics

EVENT_SOURCE = "kiln"
DETAIL_TYPE = "Compilation Job State Change"

log = logging.getLogger(__name__)


class JobEvents:
    """Publishes job state changes to an event bus, and the outcome metrics of each terminal one
    (kiln.job_metrics): every status change passes here exactly once, whichever step made it."""

    def __init__(self, events_client: Any, bus_name: str = "default", *,
                 emit_metrics: Callable[[list[Metric]], None] = emit) -> None:
        self._events = events_client
        self._bus = bus_name
        self._emit_metrics = emit_metrics

    def state_changed(self, description: dict[str, Any]) -> None:
        """Publish one event; a failure is logged, never fails the status change it reports."""
        entry = {
            "Source": EVENT_SOURCE,
            "DetailType": DETAIL_TYPE,
            "Resources": [description["CompilationJobArn"]],
            "Detail": json.dumps(description, default=str),
            "EventBusName": self._bus,
        }
        try:
            response = self._events.put_events(Entries=[entry])
            if response.get("FailedEntryCount"):
                log.warning("event for %s not accepted: %s", description["CompilationJobName"], response["Entries"])
        except Exception:  # the job record is the source of truth; the event is a notification
            log.exception("could not publish the state change of %s", description["CompilationJobName"])
        try:
            self._emit_metrics(outcome_metrics(description))
        except Exception:  # metrics must never fail a status change either
            log.exception("could not emit the metrics of %s", description["CompilationJobName"])
