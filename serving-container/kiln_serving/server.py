"""Run the server: uvicorn, one process (one copy of the model), kernel threads sized to the container."""

from __future__ import annotations

import logging
import os
import signal

import uvicorn

from kiln_serving.app import create_app
from kiln_serving.config import ServingSettings
from kiln_serving.cpu import available_cpus

log = logging.getLogger("kiln_serving")


def kernel_threads(settings: ServingSettings) -> int:
    """The threads the model's kernels run on: the setting, else the container's CPU quota."""
    return settings.threads or available_cpus()


def serve(settings: ServingSettings) -> None:
    """Serve ``settings.model`` on ``settings.host:settings.port`` until SIGTERM/SIGINT."""
    threads = kernel_threads(settings)
    # TVM's runtime and TL2cgen (through kiln.runtime) size their thread pools from TVM_NUM_THREADS when the
    # model is loaded; it is their only knob. An operator's own value wins.
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    log.info("serving %s on %s:%d with %s kernel threads", settings.model, settings.host, settings.port,
             os.environ["TVM_NUM_THREADS"])
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found: with these, a stop
    # is a normal return (exit 0), not a death by signal or a KeyboardInterrupt traceback.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1,
                log_level=settings.log_level, timeout_graceful_shutdown=30)
    log.info("stopped")
