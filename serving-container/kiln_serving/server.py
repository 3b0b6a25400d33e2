"""Run the server: uvicorn, one process (one copy of the model), kernel threads sized to the container."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal

import uvicorn

from kiln_serving.app import create_app
from kiln_serving.config import ServingSettings
from kiln_serving.cpu import available_cpus

log = logging.getLogger("kiln_serving")
# glibc's mallopt parameter for the most malloc arenas (malloc.h).
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas unless MALLOC_ARENA_MAX is set; True when capped.

    Request bodies and arrays are decoded on a pool of threads, and glibc gives each thread its own arena:
    under 8 clients with SqueezeNet-sized (600 KB) requests the server's RSS kept climbing (261 -> 320 MiB
    after 1800 requests), with 2 arenas it settled at 292 MiB (docs/adr/0013). The model itself allocates
    nothing per request (its RSS is flat over 1600 direct runs)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS) == 1)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to cap
        return False


def kernel_threads(settings: ServingSettings) -> int:
    """The threads the model's kernels run on: the setting, else the container's CPU quota."""
    return settings.threads or available_cpus()


def serve(settings: ServingSettings) -> None:
    """Serve ``settings.model`` on ``settings.host:settings.port`` until SIGTERM/SIGINT."""
    threads = kernel_threads(settings)
    limit_malloc_arenas()
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
