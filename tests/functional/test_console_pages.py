"""The console's pages over the real local API: what the API says reaches the page, never a 500."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

from tests.functional.conftest import record


def test_unknown_job_page_says_what_the_api_said(console: Any) -> None:
    # GIVEN no job of that name  WHEN its page and its artifact link are opened
    page = console.get("/console/jobs/no-such-job")
    artifact = console.get("/console/jobs/no-such-job/artifact")
    # THEN 404 with the API's error on the page, not a server error
    assert page.status_code == 404 and "ResourceNotFound" in page.text and "no-such-job" in page.text
    assert artifact.status_code == 404


def test_list_filters_reach_list_compilation_jobs_and_its_validation(console: Any) -> None:
    # GIVEN a page size the API refuses  WHEN the list is opened  THEN the API's message is shown
    page = console.get("/console?max=5000")
    assert page.status_code == 200
    assert "ValidationException" in page.text and "maxResults" in page.text


def test_create_form_shows_the_api_messages_and_keeps_the_input(console: Any, local_stack: Any,
                                                                unique: Callable[[str], str]) -> None:
    # GIVEN a form with a runtime that is no integer and a framework SageMaker does not have
    name = unique("console-form")
    form = {"name": name, "role_arn": local_stack.outputs["JobRoleArn"], "s3_uri": "s3://kiln-local-models/m.tar.gz",
            "framework": "CAFFE", "output": "s3://kiln-local-artifacts/out", "target_device": "ml_c4",
            "max_runtime": "ten minutes"}
    # WHEN submitted
    page = console.post("/console/new", data=form)
    # THEN 400, the API's messages naming the fields, the typed values kept, and no job created
    assert page.status_code == 400
    assert "ValidationException" in page.text and "stoppingCondition.maxRuntimeInSeconds" in page.text
    assert "inputConfig.framework" in page.text
    assert f'value="{name}"' in page.text and 'value="ten minutes"' in page.text
    assert console.get(f"/console/jobs/{name}").status_code == 404


def test_stop_of_an_ended_job_is_refused_with_the_api_message(console: Any, sagemaker: Any, job_request: Any,
                                                              wait_terminal: Callable[[str], dict[str, Any]],
                                                              unique: Callable[[str], str]) -> None:
    # GIVEN a job that failed (its model is missing from S3)
    name = unique("console-stop")
    sagemaker.create_compilation_job(**job_request(name))
    assert wait_terminal(name)["CompilationJobStatus"] == "FAILED"
    # WHEN its stop button is pressed
    stopped = console.post(f"/console/jobs/{name}/stop")
    # THEN the console goes back to the job page with the API's refusal shown
    assert stopped.status_code == 303
    page = console.get(stopped.headers["Location"])
    assert page.status_code == 200 and f"Compilation job {name} is FAILED and cannot be stopped" in page.text
    assert 'id="status">FAILED' in page.text



def test_job_list_pages_forward_and_back(console: Any, local_stack: Any, unique: Callable[[str], str]) -> None:
    # GIVEN five finished jobs sharing a name prefix
    tag = unique("pages")
    for i in range(5):
        local_stack.kiln.service.store.create(record(f"{tag}-{i}", 1_300_000_000.0 + i, "COMPLETED"))

    def names_and_links(url: str) -> tuple[list[str], dict[str, str]]:
        page = console.get(url)
        assert page.status_code == 200
        names = re.findall(rf'href="/console/jobs/({tag}-\d)"', page.text)
        links = {rel: html.unescape(href) for href, rel in re.findall(r'<a href="([^"]+)" rel="(next|prev)"', page.text)}
        return list(dict.fromkeys(names)), links

    # WHEN the list is paged two at a time, oldest first, to the end and back
    first, links = names_and_links(f"/console?name={tag}&max=2&order=Ascending")
    second, links2 = names_and_links(links["next"])
    third, links3 = names_and_links(links2["next"])
    back, _ = names_and_links(links3["prev"])
    start, links_start = names_and_links(links2["prev"])
    # THEN each page holds the next jobs, the last has no Next page, and Previous returns to the same pages
    assert first == [f"{tag}-0", f"{tag}-1"] and second == [f"{tag}-2", f"{tag}-3"] and third == [f"{tag}-4"]
    assert "next" not in links3 and "prev" not in links
    assert back == second and start == first and "prev" not in links_start
