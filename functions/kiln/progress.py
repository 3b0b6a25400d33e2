"""The progress lines a compiler process writes to its log, and how a follower reads them.

The compiler's log is its stdout/stderr (a file locally, CloudWatch in AWS). Besides the stage lines
its job timer logs (``stage build: start`` ... ``stage build: 12.34s``), the tuner writes one
``kiln-progress {json}`` line per kernel, so ``kiln compile`` can show kernels done / total and the
time left in the budget. One definition of both formats, used by the writer and the reader.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import IO, Any

PREFIX = "kiln-progress "
_STAGE = re.compile(r"\bstage (?P<name>[a-z_]+): (?P<what>start|(?P<seconds>\d+(?:\.\d+)?)s)\s*$")


def emit(event: str, stream: IO[str] | None = None, **fields: Any) -> None:
    """Write one progress line (flushed at once: a follower may be reading the file)."""
    print(PREFIX + json.dumps({"event": event, **fields}, default=str), file=stream or sys.stderr, flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The event in a log line: a ``kiln-progress`` document, a stage start/end, or None."""
    at = line.find(PREFIX)
    if at >= 0:
        try:
            document = json.loads(line[at + len(PREFIX):])
        except ValueError:
            return None
        return document if isinstance(document, dict) and "event" in document else None
    match = _STAGE.search(line)
    if match is None:
        return None
    if match["what"] == "start":
        return {"event": "stage", "stage": match["name"], "state": "start"}
    return {"event": "stage", "stage": match["name"], "state": "end", "seconds": float(match["seconds"])}


@dataclass
class Progress:
    """What a follower knows of a job from its log so far."""

    stage: str | None = None
    stage_started: float | None = None  # follower's clock when the stage line was read
    stages_done: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None

    def feed(self, line: str, now: float) -> dict[str, Any] | None:
        """Take in one log line; returns its event (or None)."""
        event = parse(line)
        if event is None:
            return None
        if event["event"] == "stage":
            if event["state"] == "start":
                self.stage, self.stage_started = event["stage"], now
            else:
                self.stages_done[event["stage"]] = event["seconds"]
                if self.stage == event["stage"]:
                    self.stage, self.stage_started = None, None
        elif event["event"] == "tuning":
            self.tuning = event
        return event
