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

from .aws import Reporter
from .errors import ABORTED_EXIT_CODE, CompilationError
from .job import CompilerSettings, JobSpec, run_job

log = logging.getLogger("kiln_compiler")


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
        reporter.failure("ClientError", reason)
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def main() -> int:
    """Run the job described by the environment; return the exit code."""
    logging.basicConfig(level=os.environ.get("KILN_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    reporter = Reporter(os.environ.get("KILN_TASK_TOKEN") or None,
                        float(os.environ.get("KILN_HEARTBEAT_SECONDS", "10")), _abort)
    reporter.start()
    _start_runtime_watchdog(reporter, os.environ.get("KILN_JOB", ""))
    try:
        spec = JobSpec.parse(os.environ.get("KILN_JOB", ""))
        base = os.environ.get("KILN_WORK_DIR")
        with tempfile.TemporaryDirectory(prefix="kiln-", dir=base) as work:
            output = run_job(spec, Path(work), settings=CompilerSettings.from_env(os.environ))
    except CompilationError as exc:
        log.error("job failed: %s", exc.reason)
        if exc.__cause__ or exc.__context__:
            log.debug("".join(traceback.format_exception(exc)))
        reporter.failure(exc.error_code, exc.reason)
        return exc.exit_code
    except Exception as exc:
        log.exception("internal error")
        reporter.failure("ServerError", f"ServerError: internal compiler error ({type(exc).__name__})")
        return 2
    return 0 if reporter.success(output) else ABORTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
