"""Fault injection for the compiler process: TEST-ONLY, through ``KILN_FAULT``.

Nothing in a deployment sets ``KILN_FAULT`` (neither the state machine nor CDK passes it, and the
image does not define it); the local container runner adds it to one job's environment when a
fault-injection test asks (``LocalContainerRunner.faults``, tests/workflow/test_fault_matrix.py).
Unset, :func:`install` does nothing and :func:`enter_stage` returns at once.

``KILN_FAULT`` holds faults separated by ``,``, each ``KIND[=ARG]@STAGE[*COUNT]``; STAGE is one
of the job's stages (credentials, download, unpack, load, build, package, upload; a tuning worker's
tune, a fanned-out build's gather) and the fault fires when that stage starts. ``tune.I`` fires only
in tuning worker I of the job (``KILN_TUNING_SHARD=I/N``; ``crash@tune.2`` kills worker 2 alone):

- ``crash@build``: SIGKILL the process (what the out-of-memory killer does; ECS reports exit 137)
- ``exit=137@build``: exit with that code without reporting (``exit=0``: a silent clean exit)
- ``hang@download``: sleep until stopped; heartbeats go on, so only a stop or a limit ends it
- ``oom@load``: cap the address space with ``resource.setrlimit`` and allocate past it (MemoryError)
- ``garbage@package``: write junk to stdout and report success with output that is no result
- ``s3=SlowDown:503@download*2``: S3 answers the stage's first COUNT requests (all, without COUNT)
  with that error code and HTTP status, through botocore's ``before-send`` event, so botocore's
  own retries and error parsing run as they would against S3
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["crash", "exit", "hang", "oom", "garbage", "s3"]
KINDS: tuple[str, ...] = ("crash", "exit", "hang", "oom", "garbage", "s3")
STAGES = ("credentials", "download", "unpack", "load", "tune", "gather", "build", "package", "upload")
ENV = "KILN_FAULT"


@dataclass
class Fault:
    """One injected fault: what, where, and how many times (None: every time)."""

    kind: Kind
    stage: str
    arg: str = ""
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``KIND[=ARG]@STAGE[*COUNT]``; ValueError naming what is wrong."""
        head, _, stage = text.strip().partition("@")
        stage, _, count = stage.partition("*")
        kind, _, arg = head.partition("=")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
        base, dot, worker = stage.partition(".")
        if dot and not (base == "tune" and worker.isdigit() and int(worker) >= 1):
            raise ValueError(f"{ENV}: a worker's stage is tune.I with I a worker number from 1, not {stage!r}")
        if base not in STAGES:
            raise ValueError(f"{ENV}: unknown stage {stage!r} (one of {', '.join(STAGES)})")
        if kind == "s3" and ":" not in arg:
            raise ValueError(f"{ENV}: s3 faults need =CODE:STATUS, e.g. s3=SlowDown:503@download")
        return cls(kind=kind, stage=stage, arg=arg, count=int(count) if count else None)  # type: ignore[arg-type]


class _Plan:
    """The faults of this process and the stage it is in."""

    def __init__(self, faults: list[Fault], worker: str = "") -> None:
        self.faults = faults
        self.worker = worker  # this process's tuning worker number ("" when it is no tuning worker)
        self.stage = ""
        self._lock = threading.Lock()

    def take(self, fault: Fault) -> bool:
        """Whether ``fault`` fires now (and count it)."""
        with self._lock:
            if fault.count is None:
                return True
            if fault.count <= 0:
                return False
            fault.count -= 1
            return True


_plan: _Plan | None = None


def install(spec: str | None, shard: str | None = None) -> None:
    """Read ``KILN_FAULT`` (test-only; ``shard``: this process's ``KILN_TUNING_SHARD``); hook botocore for
    S3 faults. A no-op when unset."""
    global _plan
    if not spec:
        return
    faults = [Fault.parse(part) for part in spec.split(",") if part.strip()]
    _plan = _Plan(faults, worker=(shard or "").partition("/")[0])
    log.warning("TEST-ONLY fault injection active: %s", spec)
    if any(f.kind == "s3" for f in faults):
        _hook_botocore()


def enter_stage(stage: str) -> None:
    """Called as each stage of the job starts; fires the faults planned for it."""
    if _plan is None:
        return
    _plan.stage = stage
    for fault in _plan.faults:
        here = fault.stage == stage or (_plan.worker and fault.stage == f"{stage}.{_plan.worker}")
        if here and fault.kind != "s3" and _plan.take(fault):
            log.warning("fault %s@%s fires", fault.kind, stage)
            _fire(fault)


def _fire(fault: Fault) -> None:
    sys.stderr.flush()
    if fault.kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "exit":
        os._exit(int(fault.arg or "1"))
    elif fault.kind == "hang":
        while True:
            time.sleep(3600)
    elif fault.kind == "oom":
        _allocate_past_a_memory_limit()
    elif fault.kind == "garbage":
        _report_garbage()


def _allocate_past_a_memory_limit() -> None:
    """A big allocation under a memory limit, as a compile of a too-large model meets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (in_use + 256 * 1024**2, hard))
    try:
        bytearray(64 * 1024**3)
    finally:  # the limit models one failed allocation; the process may still report
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _report_garbage() -> None:
    """Junk on stdout, then success reported with output that is not a result, then exit 0."""
    import boto3

    print("\x00\xff garbage \x1b[31m" + "#" * 200, flush=True)
    token = os.environ.get("KILN_TASK_TOKEN")
    if token:
        boto3.client("stepfunctions").send_task_success(taskToken=token,
                                                        output=json.dumps({"garbage": "\u2603" * 10}))
    os._exit(0)


class _ErrorBody:
    """The raw body of a fake HTTP response (what ``AWSResponse.content`` streams)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Any:
        yield self._data


def _s3_error(request: Any, event_name: str = "", **kwargs: Any) -> Any:
    """botocore ``before-send`` handler: an S3 error response instead of the request, while planned."""
    from botocore.awsrequest import AWSResponse

    if _plan is None:
        return None
    for fault in _plan.faults:
        if fault.kind == "s3" and fault.stage == _plan.stage and _plan.take(fault):
            code, _, status = fault.arg.partition(":")
            log.warning("fault s3=%s fires for %s %s", fault.arg, event_name, request.method)
            xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                   f"<Message>injected {code}</Message><RequestId>fault</RequestId></Error>").encode()
            return AWSResponse(request.url, int(status), {"Content-Type": "application/xml"}, _ErrorBody(xml))
    return None


def _hook_botocore() -> None:
    """Register :func:`_s3_error` on every botocore session this process creates (the job role's too)."""
    import botocore.session

    original = botocore.session.Session._register_builtin_handlers

    def register(self: Any, events: Any) -> None:
        original(self, events)
        events.register("before-send.s3", _s3_error)

    botocore.session.Session._register_builtin_handlers = register
