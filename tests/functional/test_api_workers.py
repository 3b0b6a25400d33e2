"""``kiln serve``'s API worker processes: the same handler and composition as the stack's process,
over the stack's endpoint, on one shared socket; none outlives its parent."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.workflow.conftest import wait_until


@pytest.fixture(scope="module")
def workers(local_stack: Any) -> Iterator[Any]:
    """Two API workers over the session's embedded stack, on a free port."""
    from kiln.local.api_workers import ApiWorkers

    served = ApiWorkers(local_stack, "127.0.0.1", 0, count=2).start()
    yield served
    served.stop()


def test_workers_serve_the_stacks_jobs(workers: Any, local_stack: Any, upload_model: Callable[[str, bytes], str],
                                       job_request: Callable[..., dict[str, Any]], tiny_onnx_archive: bytes) -> None:
    # GIVEN a stock SageMaker client pointed at the workers, and a model in the stack's S3
    api = boto3.client("sagemaker", endpoint_url=workers.url, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    upload_model("workers-job/model.tar.gz", tiny_onnx_archive)
    # WHEN a job is created through them
    api.create_compilation_job(**job_request("workers-job"))
    # THEN the stack's own service sees it, and it compiles to COMPLETED on the stack's runner
    assert local_stack.kiln.service.describe("workers-job")["CompilationJobName"] == "workers-job"
    assert local_stack.wait_for("workers-job", timeout=600)["CompilationJobStatus"] == "COMPLETED"
    # AND every worker answers the same (many connections, each handed to one of them)
    statuses = {api.describe_compilation_job(CompilationJobName="workers-job")["CompilationJobStatus"]
                for _ in range(20)}
    assert statuses == {"COMPLETED"}
    # AND errors keep their wire form
    with pytest.raises(ClientError) as missing:
        api.describe_compilation_job(CompilationJobName="workers-no-such-job")
    assert missing.value.response["Error"]["Code"] == "ResourceNotFound"
    # AND the console is mounted as in the stack's process
    with urllib.request.urlopen(workers.url + "/console", timeout=30) as page:
        assert page.status == 200 and b"Kiln" in page.read()


def test_workers_end_with_their_parent(local_stack: Any) -> None:
    # GIVEN workers of their own
    from kiln.local.api_workers import ApiWorkers

    served = ApiWorkers(local_stack, "127.0.0.1", 0, count=2).start()
    assert served.alive() == 2
    processes = list(served._processes)
    # WHEN their parent closes their stdin (as when `kiln serve` dies) and nothing else
    for process in processes:
        process.stdin.close()
    # THEN each ends by itself
    assert wait_until(lambda: all(p.poll() is not None for p in processes), timeout=30)
    served.stop()
