"""Fixtures of the end-to-end tests: `kiln serve` as a process, headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from kiln.local.stack import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package (requirements/debian.txt)
# a headless browser that talks to nothing but the page under test
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """`kiln serve` on free ports, exactly as a user starts it; yields (api url, aws url, log)."""
    port = free_port()
    aws_port = free_port()
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
