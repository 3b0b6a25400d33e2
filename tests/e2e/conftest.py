"""Fixtures of the end-to-end tests: `kiln serve` and `kiln serve-model` as processes, headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from kiln.local.stack import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package (requirements/debian-dev.txt)
# a headless browser that talks to nothing but the page under test
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_serve(log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """`kiln serve ARGS` on free ports, exactly as a user starts it, once it answers; returns
    (process, api url, aws url)."""
    port = free_port()
    aws_port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--port", str(port),
                                    "--aws-port", str(aws_port), *args], stdout=out, stderr=subprocess.STDOUT)
    api, aws = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{aws_port}"
    client = boto3.client("sagemaker", endpoint_url=api, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    deadline = time.time() + 60
    while True:
        try:
            client.list_compilation_jobs()
            return process, api, aws
        except Exception:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"kiln serve did not start:\n{log.read_text()}") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """`kiln serve` on free ports, exactly as a user starts it; yields (api url, aws url, log)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process, api, aws = start_serve(log)
    yield api, aws, log
    process.terminate()  # what Ctrl-C/SIGTERM does: a clean stop
    assert process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A page in headless Chromium with a fresh profile (Playwright driving Debian's chromium)."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860})
        context.set_default_timeout(30_000)
        page = context.new_page()
        yield page
        context.close()


@dataclass
class FakeUpstream:
    """A stand-in for a deployed Kiln API: records every request, answers List/Describe."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A local HTTP server at ``/prod`` that answers SageMaker JSON 1.1 with one completed job."""
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    job = {"CompilationJobName": "deployed-job", "CompilationJobArn":
           "arn:aws:sagemaker:eu-west-1:123456789012:compilation-job/deployed-job",
           "CompilationJobStatus": "COMPLETED", "CreationTime": 1796000000, "CompilationStartTime": 1796000005,
           "CompilationEndTime": 1796000065, "CompilationTargetDevice": "ml_c5", "LastModifiedTime": 1796000065}
    answers = {
        "SageMaker.ListCompilationJobs": {"CompilationJobSummaries": [job]},
        "SageMaker.DescribeCompilationJob": {**job, "RoleArn": "arn:aws:iam::123456789012:role/r", "FailureReason": "",
                                             "InputConfig": {"S3Uri": "s3://b/m.tar.gz", "Framework": "PYTORCH"},
                                             "OutputConfig": {"S3OutputLocation": "s3://b/out", "TargetDevice": "ml_c5"},
                                             "StoppingCondition": {"MaxRuntimeInSeconds": 900},
                                             "ModelArtifacts": {"S3ModelArtifacts": ""}},
    }
    upstream = FakeUpstream(url="")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        upstream.requests.append({"method": request.method, "path": request.full_path.rstrip("?"),
                                  "headers": dict(request.headers), "body": body})
        answer = answers.get(request.headers.get("X-Amz-Target", ""))
        if answer is None:
            return Response('{"__type": "UnknownOperationException", "message": "no"}', status=400)(environ, start_response)
        return Response(json.dumps(answer), content_type="application/x-amz-json-1.1")(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    upstream.url = f"http://127.0.0.1:{server.server_port}/prod"
    yield upstream
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def serve_model(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a serving process on a free port (``kiln serve-model ARTIFACT`` by default; ``{port}`` in a given
    command or environment is replaced by the port); returns its URL once /ping is 200. Each is stopped with
    SIGTERM afterwards and must exit 0."""
    started: list[subprocess.Popen[bytes]] = []

    def start(artifact: Path, command: list[str] | None = None, env: dict[str, str] | None = None) -> str:
        port = free_port()
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
