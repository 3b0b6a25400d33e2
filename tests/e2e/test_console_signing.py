"""`kiln console --api URL`: the page is served locally and its API calls carry SigV4 for execute-api."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from kiln.local.stack import free_port

from tests.e2e.conftest import FakeUpstream

KEY, SECRET, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-example"


def _expected_signature(recorded: dict[str, Any], upstream_url: str, region: str) -> str:
    """SigV4 of the request as received, over the headers it says it signed."""
    headers = {k.lower(): v for k, v in recorded["headers"].items()}
    signed = headers["authorization"].split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")
    origin = upstream_url.split("/prod", 1)[0]
    request = AWSRequest(method=recorded["method"], url=origin + recorded["path"], data=recorded["body"],
                         headers={name: headers[name] for name in signed})
    request.context["timestamp"] = headers["x-amz-date"]
    auth = SigV4Auth(Credentials(KEY, SECRET, TOKEN), "execute-api", region)
    return auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)


def test_console_signs_every_api_call_for_execute_api(fake_upstream: FakeUpstream, tmp_path: Any) -> None:
    # GIVEN a deployed API (a local fake that records requests) and the user's AWS credentials
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN,
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    # WHEN `kiln console --api URL` runs and a person opens the job list
    log = tmp_path / "console.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "console", "--api", fake_upstream.url,
                                    "--region", "eu-west-1", "--port", str(port)], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline, page = time.time() + 60, ""
        while not page:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/console", timeout=10) as response:
                    page = response.read().decode()
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise AssertionError(f"kiln console did not serve:\n{log.read_text()}") from None
                time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(timeout=30)
    # THEN the page shows what the upstream API returned
    assert 'data-job="deployed-job"' in page and "PYTORCH" in page and "ml_c5" in page
    # AND every call the console made was SigV4-signed for execute-api in the given region, with the
    # session token, and the signature verifies over what the upstream received
    targets = [r["headers"].get("X-Amz-Target") for r in fake_upstream.requests]
    assert targets == ["SageMaker.ListCompilationJobs", "SageMaker.DescribeCompilationJob"]
    for recorded in fake_upstream.requests:
        authorization = recorded["headers"]["Authorization"]
        assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={KEY}/")
        assert "/eu-west-1/execute-api/aws4_request" in authorization
        assert recorded["headers"]["X-Amz-Security-Token"] == TOKEN
        assert recorded["path"] == "/prod"
        signature = authorization.rsplit("Signature=", 1)[1]
        assert signature == _expected_signature(recorded, fake_upstream.url, "eu-west-1")
