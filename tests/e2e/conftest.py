"""Fixtures of the end-to-end tests: `kiln serve` and `kiln serve-model` as processes, as a user starts them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """`kiln serve` on free ports, exactly as a user starts it; yields (api url, aws url, log)."""
    port = _free_port()
    aws_port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--port", str(port),
                                    "--aws-port", str(aws_port)], stdout=out, stderr=subprocess.STDOUT)
    api, aws = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{aws_port}"
    client = boto3.client("sagemaker", endpoint_url=api, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    deadline = time.time() + 60
    while True:
        try:
            client.list_compilation_jobs()
            break
        except Exception:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"kiln serve did not start:\n{log.read_text()}") from None
            time.sleep(0.5)
    yield api, aws, log
    process.terminate()  # what Ctrl-C/SIGTERM does: a clean stop
    assert process.wait(timeout=30) == 0


@pytest.fixture
def serve_model(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a serving process on a free port (``kiln serve-model ARTIFACT`` by default; ``{port}`` in a given
    command or environment is replaced by the port); returns its URL once /ping is 200. Each is stopped with
    SIGTERM afterwards and must exit 0."""
    started: list[subprocess.Popen[bytes]] = []

    def start(artifact: Path, command: list[str] | None = None, env: dict[str, str] | None = None) -> str:
        port = _free_port()
        argv = command or [sys.executable, "-m", "kiln.cli", "serve-model", str(artifact), "--port", str(port)]
        log = tmp_path / f"serve-model-{port}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [a.replace("{port}", str(port)) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                env={k: v.replace("{port}", str(port)) for k, v in env.items()} if env else None)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=5) as response:
                    if response.status == 200:
                        return url
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"the serving process did not become ready:\n{log.read_text()}")
            time.sleep(0.3)

    yield start
    for process in started:
        process.terminate()
        assert process.wait(timeout=60) == 0
