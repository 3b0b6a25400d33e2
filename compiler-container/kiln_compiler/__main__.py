"""Container entrypoint: ``python -m kiln_compiler`` (job in ``KILN_JOB``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from . import faults
from .aws import Reporter
from .errors import ABORTED_EXIT_CODE, CompilationError, scrub_paths
from .job import SHARD_ENV, CompilerSettings, JobSpec, run_job
from .options import Shard

log = logging.getLogger("kiln_compiler")
RUNTIME_EXCEEDED_ERROR = "Kiln.MaxRuntimeExceeded"  # kiln.workflow reads it; the cause is the FailureReason


def _abort(code: str) -> None:
    """The workflow stopped or timed out this job: stop at once, nobody is waiting for a result."""
    log.error("job aborted by the workflow (%s); exiting", code)
    sys.stderr.flush()
    os._exit(ABORTED_EXIT_CODE)


def _start_runtime_watchdog(reporter: Reporter, raw_job: str) -> None:
    """Enforce MaxRuntimeInSeconds from the container's start: report and exit when it passes.

    The workflow's state timeout is the backstop; this makes the limit exact and the reason clear."""
    try:
        seconds = int(json.loads(raw_job)["StoppingCondition"]["MaxRuntimeInSeconds"])
    except (ValueError, KeyError, TypeError):
        return

    def expire() -> None:
        reason = f"ClientError: the compilation exceeded MaxRuntimeInSeconds ({seconds} s)"
        log.error(reason)
        # its own error name: a tuning worker past the limit ends the whole job (the workflow's Map state)
        reporter.failure(RUNTIME_EXCEEDED_ERROR, reason)
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _user_facing(reason: str, work: str | None, base: str | None) -> str:
    """The reason without the compiler's own paths: the work directory, temporary files, installed code."""
    roots = [r for r in (work, base, tempfile.gettempdir(), sys.prefix, sys.base_prefix,
                         str(Path(__file__).resolve().parents[1])) if r]
    return scrub_paths(reason, model_dir=Path(work) / "model" if work else None, internal_roots=roots)


def main() -> int:
    """Run the job described by the environment; return the exit code."""
    logging.basicConfig(level=os.environ.get("KILN_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    faults.install(os.environ.get(faults.ENV), os.environ.get(SHARD_ENV))  # TEST-ONLY: never set in a deployment
    reporter = Reporter(os.environ.get("KILN_TASK_TOKEN") or None,
                        float(os.environ.get("KILN_HEARTBEAT_SECONDS", "10")), _abort)
    reporter.start()
    _start_runtime_watchdog(reporter, os.environ.get("KILN_JOB", ""))
    base = os.environ.get("KILN_WORK_DIR")
    work: str | None = None
    try:
        spec = JobSpec.parse(os.environ.get("KILN_JOB", ""))
        # a tuning worker of a fanned-out job (the workflow's Map state sets it, ADR 0023)
        shard = Shard.parse(os.environ[SHARD_ENV]) if os.environ.get(SHARD_ENV) else None
        with tempfile.TemporaryDirectory(prefix="kiln-", dir=base) as work:
            output = run_job(spec, Path(work), settings=CompilerSettings.from_env(os.environ), shard=shard)
    except CompilationError as exc:
        log.error("job failed: %s", exc.reason)
        if exc.__cause__ or exc.__context__:
            log.debug("".join(traceback.format_exception(exc)))
        reporter.failure(exc.error_code, _user_facing(exc.reason, work, base))
        return exc.exit_code
    except MemoryError:
        log.exception("out of memory")
        reporter.failure("ServerError", "ServerError: the compiler ran out of memory (MemoryError); the model needs "
                                        "a larger compiler task")
        return 2
    except Exception as exc:
        log.exception("internal error")
        reporter.failure("ServerError", f"ServerError: internal compiler error ({type(exc).__name__})")
        return 2
    return 0 if reporter.success(output) else ABORTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
