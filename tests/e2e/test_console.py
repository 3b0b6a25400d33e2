"""The web console in headless Chromium against `kiln serve`, with real jobs: what a person sees."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from kiln_compiler.samples import input_shapes, load_light_model
from playwright.sync_api import Page, expect

from tests.conftest import tar_gz, tiny_onnx_model

ROLE = "arn:aws:iam::123456789012:role/kiln-compilation-job"
TERMINAL = ("COMPLETED", "FAILED", "STOPPED")
RUNNING = re.compile("STARTING|INPROGRESS")


@pytest.fixture(scope="module")
def clients(served: tuple[str, str, Path]) -> tuple[Any, Any]:
    api, aws, _ = served
    kw = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    return boto3.client("sagemaker", endpoint_url=api, **kw), boto3.client("s3", endpoint_url=aws, **kw)


@pytest.fixture(scope="module")
def create_job(clients: tuple[Any, Any]) -> Callable[..., None]:
    """Upload ``archive`` and create a job for it through the public API (as any client would)."""
    sagemaker, s3 = clients

    def create(name: str, archive: bytes, data_input_config: dict[str, list[int]], **output: str) -> None:
        s3.put_object(Bucket="kiln-local-models", Key=f"{name}/model.tar.gz", Body=archive)
        sagemaker.create_compilation_job(
            CompilationJobName=name, RoleArn=ROLE,
            InputConfig={"S3Uri": f"s3://kiln-local-models/{name}/model.tar.gz", "Framework": "ONNX",
                         "DataInputConfig": json.dumps(data_input_config)},
            OutputConfig={"S3OutputLocation": f"s3://kiln-local-artifacts/{name}", "TargetDevice": "ml_c4", **output},
            StoppingCondition={"MaxRuntimeInSeconds": 900})

    return create


def _wait_for(sagemaker: Any, name: str, statuses: tuple[str, ...], timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while True:
        status = sagemaker.describe_compilation_job(CompilationJobName=name)["CompilationJobStatus"]
        if status in statuses or time.time() > deadline:
            return str(status)
        time.sleep(0.5)


@pytest.mark.slow
def test_console_shows_jobs_failure_reason_manifest_and_stops_a_running_job(
        served: tuple[str, str, Path], clients: tuple[Any, Any], create_job: Callable[..., None],
        browser_page: Page, tmp_path: Path) -> None:
    api, _, _ = served
    sagemaker, _ = clients
    shots = tmp_path / "screenshots"
    page = browser_page
    # GIVEN a completed job (a real small network), a failed one (an archive without a model) ...
    create_job("console-completed", tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}), {"x": [1, 8]})
    create_job("console-failed", tar_gz({"notes.txt": b"no model here"}), {"x": [1, 8]})
    assert _wait_for(sagemaker, "console-completed", TERMINAL) == "COMPLETED"
    assert _wait_for(sagemaker, "console-failed", TERMINAL) == "FAILED"
    # ... and a running one (SqueezeNet with a tuning budget far longer than the test)
    squeezenet = load_light_model("squeezenet")
    create_job("console-running", tar_gz({"model.onnx": squeezenet.SerializeToString()}),
               {k: list(v) for k, v in input_shapes(squeezenet).items()},
               CompilerOptions=json.dumps({"tuning": {"minutes": 10}}))

    # WHEN a person opens the console
    page.goto(f"{api}/console")
    # THEN the list shows the three jobs with their statuses, targets and framework
    rows = page.locator("table.jobs tbody tr[data-job]")
    expect(rows).to_have_count(3)
    expect(page.locator("tr[data-job=console-completed] .status")).to_have_text("COMPLETED")
    expect(page.locator("tr[data-job=console-failed] .status")).to_have_text("FAILED")
    expect(page.locator("tr[data-job=console-running] .status")).to_have_text(RUNNING)
    expect(page.locator("tr[data-job=console-completed]")).to_contain_text("ml_c4")
    expect(page.locator("tr[data-job=console-completed]")).to_contain_text("ONNX")
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)

    # AND filtering by status (ListCompilationJobs StatusEquals) leaves the failed job only
    page.select_option("select[name=status]", "FAILED")
    page.click("form.filters button")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job", "console-failed")
    # AND one job per page, sorted by name, pages through ListCompilationJobs' NextToken
    page.goto(f"{api}/console?name=console-&max=1&sort=Name&order=Ascending")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job", "console-completed")
    page.click("a[rel=next]")
    expect(rows.first).to_have_attribute("data-job", "console-failed")

    # WHEN the failed job is opened THEN its FailureReason and what to do are shown
    page.click("a[href='/console/jobs/console-failed']")
    expect(page.locator("#status")).to_have_text("FAILED")
    expect(page.locator("#failure .reason")).to_contain_text("ClientError: InputConfiguration: no ONNX model file")
    expect(page.locator("#failure .fix")).to_contain_text("What to do")
    expect(page.locator("button", has_text="Delete job")).to_be_visible()
    page.screenshot(path=str(shots / "job-failed.png"), full_page=True)

    # WHEN the completed job is opened THEN the manifest (ISA, digests, kernels) and a download link are shown
    page.goto(f"{api}/console/jobs/console-completed")
    expect(page.locator("#isa strong")).to_have_text("AVX2")  # ml_c4's code needs AVX2 and FMA
    expect(page.locator("#isa .features")).to_contain_text("avx2 fma")
    expect(page.locator("#manifest table.digests")).to_contain_text("model.so")
    expect(page.locator("#tuning")).to_contain_text("default schedule")
    expect(page.locator(".timeline li")).to_have_count(3)
    download = page.request.get(api + (page.locator("a", has_text="Download artifact").get_attribute("href") or ""))
    assert download.ok and download.body()[:2] == b"\x1f\x8b"  # the artifact itself, gzip
    page.screenshot(path=str(shots / "job-completed.png"), full_page=True)

    # WHEN the running job's Stop button is pressed THEN the job ends STOPPED (the page follows it)
    page.goto(f"{api}/console/jobs/console-running")
    expect(page.locator("#status")).to_have_text(RUNNING)
    page.screenshot(path=str(shots / "job-running.png"), full_page=True)
    page.click("button:has-text('Stop job')")
    expect(page.locator(".flash")).to_have_text("stop requested")
    expect(page.locator("#status")).to_have_text("STOPPED", timeout=120_000)
    assert sagemaker.describe_compilation_job(CompilationJobName="console-running")["CompilationJobStatus"] == "STOPPED"
    page.screenshot(path=str(shots / "job-stopped.png"), full_page=True)

    # WHEN a job is created with a target the API refuses THEN the form shows the API's validation message
    page.goto(f"{api}/console/new")
    page.fill("input[name=name]", "console-refused")
    page.fill("input[name=s3_uri]", "s3://kiln-local-models/console-completed/model.tar.gz")
    page.fill("input[name=data_input_config]", '{"x": [1, 8]}')
    page.fill("input[name=output]", "s3://kiln-local-artifacts/console-refused")
    page.fill("input[name=target_device]", "ml_inf1")
    page.click("form.create button[type=submit]")
    expect(page.locator(".error")).to_contain_text("ValidationException")
    expect(page.locator(".error")).to_contain_text("'ml_inf1' at 'outputConfig.targetDevice'")
    expect(page.locator("input[name=name]")).to_have_value("console-refused")  # what was typed is kept
    page.screenshot(path=str(shots / "create-refused.png"), full_page=True)
    # AND with a valid target the job is created and its page opens
    page.fill("input[name=target_device]", "ml_c4")
    page.click("form.create button[type=submit]")
    expect(page.locator("h1")).to_contain_text("console-refused")
    assert _wait_for(sagemaker, "console-refused", TERMINAL) == "COMPLETED"

    # WHEN the completed job is deleted from its page THEN it is gone from the list
    page.goto(f"{api}/console/jobs/console-completed")
    page.click("button:has-text('Delete job')")
    expect(page.locator(".flash")).to_have_text("deleted console-completed")
    expect(page.locator("tr[data-job=console-completed]")).to_have_count(0)
    expect(page.locator("tr[data-job=console-failed]")).to_have_count(1)
    page.screenshot(path=str(shots / "jobs-after-delete.png"), full_page=True)
    assert sorted(p.name for p in shots.glob("*.png")) == sorted(
        ["jobs.png", "job-failed.png", "job-completed.png", "job-running.png", "job-stopped.png",
         "create-refused.png", "jobs-after-delete.png"])
