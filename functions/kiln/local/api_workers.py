"""``kiln serve``'s API in worker processes: the API handler off the embedded stack's interpreter.

The embedded stack (moto's server, the Step Functions interpreter, the in-process workflow and
registry handlers, the compiler runner) keeps its process. Each API request is the API Lambda's
work: parse, validate, a few calls to the stack's endpoint. In the stack's process those requests
queue for one interpreter lock with everything else (measured: p99 9.5 s under ``make load``);
here they run in ``count`` processes of their own, which share one listening socket (the kernel
hands each connection to one of them). A worker builds the same composition the stack installs
(:class:`kiln.wiring.Kiln` over clients bound to the stack's endpoint, the stack's settings) and
serves the same handler (:class:`kiln.local.server.ApiServer`), the web console mounted as in the
stack's process. A worker ends when its parent closes its stdin, so none outlives ``kiln serve``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("kiln.serve")
READY = b"kiln-api-worker ready"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to serve the stack's API (sent on its stdin: it holds the pagination key)."""

    fd: int
    endpoint_url: str
    settings: dict[str, Any]
    outputs: dict[str, str]
    log_level: int = logging.WARNING


class ApiWorkers:
    """``count`` API worker processes on ``host:port``, over the started ``stack``."""

    def __init__(self, stack: Any, host: str = "127.0.0.1", port: int = 8080, count: int = 2) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self._stack = stack
        self._count = count
        self._socket = socket.create_server((host, port), backlog=256)
        # A connection wakes every worker's poll; the ones that lose the accept get EAGAIN, not a hang.
        self._socket.setblocking(False)
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://{host}:{self.port}"
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> ApiWorkers:
        spec = WorkerSpec(fd=self._socket.fileno(), endpoint_url=self._stack.endpoint_url,
                          settings=self._stack.settings.model_dump(mode="json"), outputs=dict(self._stack.outputs),
                          log_level=logging.getLogger("kiln.serve").getEffectiveLevel())
        line = (json.dumps(asdict(spec)) + "\n").encode()
        for _ in range(self._count):
            process = subprocess.Popen([sys.executable, "-m", "kiln.local.api_workers"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, pass_fds=(self._socket.fileno(),))
            self._processes.append(process)
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(line)
            process.stdin.flush()  # stdin stays open: its end is the worker's signal to stop
        for process in self._processes:  # each says READY on its stdout once it serves (or dies)
            assert process.stdout is not None
            if process.stdout.readline().strip() != READY:
                self.stop()
                raise RuntimeError(f"an API worker failed to start (exit code {process.wait(timeout=10)}); "
                                   "its error is above")
        return self

    def alive(self) -> int:
        """Workers running now."""
        return sum(1 for p in self._processes if p.poll() is None)

    def stop(self) -> None:
        """End the workers (stdin closed, then SIGTERM) and close the socket."""
        for process in self._processes:
            with contextlib.suppress(OSError):
                assert process.stdin is not None
                process.stdin.close()
            with contextlib.suppress(OSError):
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._processes.clear()
        self._socket.close()


def serve(spec: WorkerSpec, ready: Any) -> None:
    """Serve the API (and the console) on the inherited socket until stdin closes or SIGTERM; say
    :data:`READY` on ``ready`` once serving."""
    from kiln import contract, wiring
    from kiln.config import KilnSettings
    from kiln.console.app import PREFIX, Artifacts, ConsoleApp, FormDefaults, local_api
    from kiln.local import heap
    from kiln.local.server import ApiServer
    from kiln.local.stack import LocalClients

    clients = LocalClients(spec.endpoint_url)
    kiln = wiring.Kiln(KilnSettings(**spec.settings), clients)
    wiring.install(kiln)
    # Built now, not by the first requests: 20 creates at once otherwise each loaded botocore's
    # SageMaker model and built the service's clients, in every worker (ADR 0050).
    kiln.service  # noqa: B018
    contract.service_model()
    server = ApiServer(fd=spec.fd)
    outputs = spec.outputs
    server.mount(PREFIX, ConsoleApp(local_api(server.url), Artifacts(clients.client("s3")), FormDefaults(
        role_arn=outputs["JobRoleArn"], input_prefix=f"s3://{outputs['ModelBucket']}/",
        output_prefix=f"s3://{outputs['ArtifactBucket']}/")))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def until_parent_closes_stdin() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read holds its lock, and
        # the interpreter's shutdown then aborts ("could not acquire lock for <stdin>", seen)
        while os.read(0, 4096):
            pass
        done.set()

    threading.Thread(target=until_parent_closes_stdin, name="kiln-api-parent", daemon=True).start()
    server.start()
    heap.settle()  # started: the models and clients it loaded live as long as the worker (ADR 0043)
    ready.write(READY + b"\n")
    ready.flush()
    done.wait()
    server.stop()


def main() -> int:
    spec = WorkerSpec(**json.loads(sys.stdin.buffer.readline()))
    ready = sys.stdout.buffer  # the parent reads READY here, and nothing else
    sys.stdout = sys.stderr  # as in `kiln serve`: the handler's Powertools lines are logs, not output
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kiln.serve").setLevel(spec.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from kiln.handlers import api

    api.logger.setLevel(max(spec.log_level, logging.WARNING))
    serve(spec, ready)
    # Served and stopped: skip the interpreter's teardown (a second or more of a loaded host's CPU
    # while `kiln serve` waits for its workers; nothing in it to save).
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
