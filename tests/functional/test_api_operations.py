"""Every operation's happy path and error path through boto3 / plain HTTP against ``kiln serve``."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import botocore.config
import botocore.session
import pytest
from botocore.exceptions import ClientError

from tests.functional.conftest import ACCOUNT, record

STATUSES = ("COMPLETED", "FAILED", "INPROGRESS", "STARTING", "STOPPED", "STOPPING")
DESCRIBE_REQUIRED = botocore.session.get_session().get_service_model("sagemaker").operation_model(
    "DescribeCompilationJob").output_shape.required_members


def error_of(call: Callable[[], Any]) -> dict[str, str]:
    with pytest.raises(ClientError) as info:
        call()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return dict(info.value.response["Error"])


# -- create / describe / list / stop / delete ----------------------------------------------------------
def test_create_then_describe_has_every_required_member(sagemaker: Any, job_request: Callable[..., Any],
                                                       unique: Callable[[str], str],
                                                       wait_terminal: Callable[..., Any]) -> None:
    # GIVEN a valid request whose model does not exist (the job fails fast in the compiler)
    name = unique("describe")
    # WHEN it is created and described at once
    arn = sagemaker.create_compilation_job(**job_request(name, Tags=[{"Key": "team", "Value": "vision"}]))
    job = sagemaker.describe_compilation_job(CompilationJobName=name)
    # THEN the ARN is SageMaker's, and every member botocore marks required is there even while it runs
    assert arn["CompilationJobArn"] == f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:compilation-job/{name}"
    assert set(DESCRIBE_REQUIRED) <= set(job), set(DESCRIBE_REQUIRED) - set(job)
    if job["CompilationJobStatus"] in ("STARTING", "INPROGRESS"):
        assert job["FailureReason"] == "" and job["ModelArtifacts"] == {"S3ModelArtifacts": ""}
    assert job["InputConfig"]["Framework"] == "ONNX" and job["OutputConfig"]["TargetDevice"] == "ml_c4"
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 600
    assert job["CreationTime"] <= job["LastModifiedTime"]
    # AND it ends FAILED with a SageMaker-style client error, still with every required member
    final = wait_terminal(name)
    assert final["CompilationJobStatus"] == "FAILED"
    assert final["FailureReason"].startswith("ClientError: InputConfiguration")
    assert set(DESCRIBE_REQUIRED) <= set(final)


def test_duplicate_name_is_resource_in_use(sagemaker: Any, job_request: Callable[..., Any],
                                           unique: Callable[[str], str]) -> None:
    # GIVEN an existing job
    name = unique("dup")
    sagemaker.create_compilation_job(**job_request(name))
    # WHEN a second job of that name is created
    error = error_of(lambda: sagemaker.create_compilation_job(**job_request(name)))
    # THEN ResourceInUse names the job
    assert error["Code"] == "ResourceInUse" and name in error["Message"]


@pytest.mark.parametrize("operation", ["describe_compilation_job", "stop_compilation_job",
                                       "delete_compilation_job"])
def test_unknown_job_is_resource_not_found(sagemaker: Any, operation: str) -> None:
    # GIVEN a name no job has / WHEN it is used / THEN ResourceNotFound
    error = error_of(lambda: getattr(sagemaker, operation)(CompilationJobName="no-such-job-anywhere"))
    assert error["Code"] == "ResourceNotFound" and "no-such-job-anywhere" in error["Message"]


def test_stop_then_delete(sagemaker: Any, job_request: Callable[..., Any], unique: Callable[[str], str],
                          wait_terminal: Callable[..., Any]) -> None:
    # GIVEN a job that has just started
    name = unique("stop")
    sagemaker.create_compilation_job(**job_request(name))
    # WHEN it is deleted while active / THEN ValidationException: only terminal jobs can be deleted
    error = error_of(lambda: sagemaker.delete_compilation_job(CompilationJobName=name))
    assert error["Code"] == "ValidationException" and "Stop it first" in error["Message"]
    # WHEN it is stopped
    sagemaker.stop_compilation_job(CompilationJobName=name)
    # THEN it is STOPPING or already STOPPED, and ends STOPPED
    assert sagemaker.describe_compilation_job(CompilationJobName=name)["CompilationJobStatus"] in (
        "STOPPING", "STOPPED")
    final = wait_terminal(name)
    assert final["CompilationJobStatus"] == "STOPPED" and "CompilationEndTime" in final
    # AND stopping again is refused, deleting works and the job is gone
    assert error_of(lambda: sagemaker.stop_compilation_job(CompilationJobName=name))["Code"] == "ValidationException"
    sagemaker.delete_compilation_job(CompilationJobName=name)
    assert error_of(lambda: sagemaker.describe_compilation_job(CompilationJobName=name))["Code"] == "ResourceNotFound"


@pytest.mark.parametrize("status", ["STARTING", "INPROGRESS", "STOPPING"])
def test_delete_refused_for_every_active_status(sagemaker: Any, local_stack: Any, unique: Callable[[str], str],
                                                status: str) -> None:
    # GIVEN a stored job in an active status (no workflow behind it)
    name = unique("active")
    local_stack.kiln.service.store.create(record(name, 1_500_000_000.0, status))
    # WHEN it is deleted
    error = error_of(lambda: sagemaker.delete_compilation_job(CompilationJobName=name))
    # THEN ValidationException names the status, and the job is still there
    assert error["Code"] == "ValidationException" and status in error["Message"]
    assert sagemaker.describe_compilation_job(CompilationJobName=name)["CompilationJobStatus"] == status


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "STOPPED"])
def test_delete_allowed_for_every_terminal_status(sagemaker: Any, local_stack: Any, unique: Callable[[str], str],
                                                  status: str) -> None:
    # GIVEN a stored job in a terminal status
    name = unique("terminal")
    local_stack.kiln.service.store.create(record(name, 1_500_000_000.0, status))
    # WHEN it is deleted / THEN it is gone; stopping it had been refused
    assert error_of(lambda: sagemaker.stop_compilation_job(CompilationJobName=name))["Code"] == "ValidationException"
    sagemaker.delete_compilation_job(CompilationJobName=name)
    assert error_of(lambda: sagemaker.describe_compilation_job(CompilationJobName=name))["Code"] == "ResourceNotFound"


def test_list_returns_summaries(sagemaker: Any, job_request: Callable[..., Any], unique: Callable[[str], str]) -> None:
    # GIVEN a job on a TargetPlatform
    name = unique("listed")
    output = {"S3OutputLocation": "s3://kiln-local-artifacts/p", "TargetPlatform": {"Os": "LINUX", "Arch": "ARM64"}}
    sagemaker.create_compilation_job(**job_request(name, OutputConfig=output))
    # WHEN jobs are listed by name
    summaries = sagemaker.list_compilation_jobs(NameContains=name)["CompilationJobSummaries"]
    # THEN its summary carries the platform and botocore's required members
    assert [s["CompilationJobName"] for s in summaries] == [name]
    summary = summaries[0]
    assert summary["CompilationTargetPlatformOs"] == "LINUX" and summary["CompilationTargetPlatformArch"] == "ARM64"
    required = botocore.session.get_session().get_service_model("sagemaker").shape_for(
        "CompilationJobSummary").required_members
    assert set(required) <= set(summary)


# -- tags ----------------------------------------------------------------------------------------------
def test_tags_add_list_delete(sagemaker: Any, job_request: Callable[..., Any], unique: Callable[[str], str]) -> None:
    # GIVEN a job created with one tag
    name = unique("tags")
    arn = sagemaker.create_compilation_job(**job_request(name, Tags=[{"Key": "team", "Value": "vision"}]))[
        "CompilationJobArn"]
    assert sagemaker.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "team", "Value": "vision"}]
    # WHEN tags are added (one replacing an existing key)
    added = sagemaker.add_tags(ResourceArn=arn, Tags=[{"Key": "team", "Value": "speech"},
                                                      {"Key": "cost-center", "Value": "42"}])
    # THEN the result and ListTags show the merged set
    expected = [{"Key": "team", "Value": "speech"}, {"Key": "cost-center", "Value": "42"}]
    assert added["Tags"] == expected
    assert sagemaker.list_tags(ResourceArn=arn)["Tags"] == expected
    # WHEN a tag is deleted (and an absent key is ignored) / THEN only the other remains
    sagemaker.delete_tags(ResourceArn=arn, TagKeys=["team", "absent"])
    assert sagemaker.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "cost-center", "Value": "42"}]


def test_tags_are_limited_to_fifty_per_job(sagemaker: Any, job_request: Callable[..., Any],
                                           unique: Callable[[str], str]) -> None:
    # GIVEN a job with 50 tags
    name = unique("tags50")
    arn = sagemaker.create_compilation_job(**job_request(name))["CompilationJobArn"]
    sagemaker.add_tags(ResourceArn=arn, Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(50)])
    assert len(sagemaker.list_tags(ResourceArn=arn)["Tags"]) == 50
    # WHEN one more is added / THEN ValidationException, and the tags are unchanged
    error = error_of(lambda: sagemaker.add_tags(ResourceArn=arn, Tags=[{"Key": "one-more", "Value": "v"}]))
    assert error["Code"] == "ValidationException" and "50" in error["Message"]
    assert len(sagemaker.list_tags(ResourceArn=arn)["Tags"]) == 50


@pytest.mark.parametrize("arn", [
    f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:compilation-job/never-created",
    "arn:aws:sagemaker:us-east-1:999999999999:compilation-job/{name}",
    "arn:aws:sagemaker:eu-west-1:" + ACCOUNT + ":compilation-job/{name}",
])
def test_tags_of_unknown_arns_are_resource_not_found(sagemaker: Any, job_request: Callable[..., Any],
                                                     unique: Callable[[str], str], arn: str) -> None:
    # GIVEN an ARN that does not identify an existing job of this account and region
    name = unique("arn")
    sagemaker.create_compilation_job(**job_request(name))
    arn = arn.format(name=name)
    # WHEN tags are read, added or deleted / THEN ResourceNotFound each time
    for call in (lambda: sagemaker.list_tags(ResourceArn=arn),
                 lambda: sagemaker.add_tags(ResourceArn=arn, Tags=[{"Key": "k", "Value": "v"}]),
                 lambda: sagemaker.delete_tags(ResourceArn=arn, TagKeys=["k"])):
        assert error_of(call)["Code"] == "ResourceNotFound"


# -- wire forms: REST routes and raw JSON 1.1 ----------------------------------------------------------
def test_rest_routes(http: Callable[..., Any], job_request: Callable[..., Any], unique: Callable[[str], str],
                     wait_terminal: Callable[..., Any]) -> None:
    # GIVEN a plain HTTP client and a job request with SageMaker's member names
    name = unique("rest")
    # WHEN the job is created with POST /compilation-jobs
    status, _, body = http("POST", "/compilation-jobs", job_request(name))
    # THEN 201 with the ARN, and GET /compilation-jobs/{name} describes it
    assert status == 201 and body["CompilationJobArn"].endswith(f"/{name}")
    status, _, job = http("GET", f"/compilation-jobs/{name}")
    assert status == 200 and job["CompilationJobName"] == name and isinstance(job["CreationTime"], int | float)
    # AND GET /compilation-jobs lists it with filters from the query string
    status, _, listed = http("GET", f"/compilation-jobs?NameContains={name}&MaxResults=5")
    assert status == 200 and [s["CompilationJobName"] for s in listed["CompilationJobSummaries"]] == [name]
    # AND tags work under /compilation-jobs/{name}/tags
    status, _, tags = http("POST", f"/compilation-jobs/{name}/tags",
                           {"Tags": [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}, {"Key": "c", "Value": "3"}]})
    assert status == 200 and len(tags["Tags"]) == 3
    status, _, _ = http("DELETE", f"/compilation-jobs/{name}/tags?TagKeys=a&TagKeys=c")
    assert status == 200
    status, _, tags = http("GET", f"/compilation-jobs/{name}/tags")
    assert status == 200 and tags["Tags"] == [{"Key": "b", "Value": "2"}]
    # AND POST /stop stops it, DELETE removes it, and a later GET is ResourceNotFound
    assert http("POST", f"/compilation-jobs/{name}/stop")[0] == 200
    assert wait_terminal(name)["CompilationJobStatus"] == "STOPPED"
    assert http("DELETE", f"/compilation-jobs/{name}")[0] == 200
    status, _, error = http("GET", f"/compilation-jobs/{name}")
    assert status == 400 and error["__type"] == "ResourceNotFound"


def test_rest_errors(http: Callable[..., Any], job_request: Callable[..., Any]) -> None:
    # GIVEN plain HTTP requests that are invalid
    # WHEN they are sent / THEN SageMaker-style errors with the member named
    status, _, error = http("POST", "/compilation-jobs", job_request("bad_name"))
    assert status == 400 and error["__type"] == "ValidationException" and "compilationJobName" in error["message"]
    status, _, error = http("GET", "/compilation-jobs?MaxResults=ten")
    assert status == 400 and error["__type"] == "ValidationException" and "maxResults" in error["message"]
    status, _, error = http("POST", "/compilation-jobs", raw=b"{oops")
    assert status == 400 and error["__type"] == "SerializationException"
    status, _, error = http("GET", "/no-such-route")
    assert status == 404 and error["__type"] == "UnknownOperationException" and "/no-such-route" in error["message"]
    status, _, error = http("DELETE", "/compilation-jobs/nobody-here/tags")
    assert status == 400 and error["__type"] == "ResourceNotFound"


def test_aws_cli_like_json_request(amz_json: Callable[..., Any], sagemaker: Any, job_request: Callable[..., Any],
                                   unique: Callable[[str], str]) -> None:
    # GIVEN a job, and the request `aws sagemaker list-compilation-jobs` sends (JSON 1.1, X-Amz-Target)
    name = unique("cli")
    sagemaker.create_compilation_job(**job_request(name))
    # WHEN it is posted to /
    status, headers, body = amz_json("SageMaker.ListCompilationJobs", {"NameContains": name, "MaxResults": 5})
    # THEN 200, JSON 1.1, timestamps as epoch numbers
    assert status == 200 and headers["Content-Type"].startswith("application/x-amz-json-1.1")
    (summary,) = body["CompilationJobSummaries"]
    assert summary["CompilationJobName"] == name and isinstance(summary["CreationTime"], int | float)
    status, _, described = amz_json("SageMaker.DescribeCompilationJob", {"CompilationJobName": name})
    assert status == 200 and described["CompilationJobArn"].endswith(name)
    # AND an empty body (no members) is accepted like {}
    status, _, body = amz_json("SageMaker.ListCompilationJobs", raw=b"")
    assert status == 200 and "CompilationJobSummaries" in body


# -- pagination over 250 jobs ------------------------------------------------------------------------------
SEED_BASE = 1_400_000_000.0


@pytest.fixture(scope="module")
def seeded(local_stack: Any) -> dict[str, Any]:
    """250 jobs written straight to the store: distinct creation times, shuffled names, every status."""
    tag = "pg" + uuid.uuid4().hex[:6]
    store = local_stack.kiln.service.store
    jobs = []
    for i in range(250):
        name = f"{tag}-{(i * 97) % 250:03d}"  # name order differs from creation order
        job = record(name, SEED_BASE + i * 10, STATUSES[(i * 7) % 6])
        store.create(job)
        jobs.append(job)
    return {"tag": tag, "jobs": jobs}


def expected_order(jobs: list[dict[str, Any]], sort_by: str, order: str) -> list[str]:
    keys = {"CreationTime": lambda j: j["CreationTime"], "Name": lambda j: j["CompilationJobName"],
            "Status": lambda j: (j["CompilationJobStatus"], j["CreationTime"])}
    return [j["CompilationJobName"] for j in sorted(jobs, key=keys[sort_by], reverse=order == "Descending")]


def list_all(client: Any, page_size: int, **filters: Any) -> tuple[list[str], int]:
    names: list[str] = []
    pages = 0
    token = None
    while True:
        kwargs = {**filters, "MaxResults": page_size, **({"NextToken": token} if token else {})}
        page = client.list_compilation_jobs(**kwargs)
        pages += 1
        assert len(page["CompilationJobSummaries"]) <= page_size
        names += [s["CompilationJobName"] for s in page["CompilationJobSummaries"]]
        token = page.get("NextToken")
        if not token:
            return names, pages


@pytest.mark.parametrize("sort_order", ["Ascending", "Descending"])
@pytest.mark.parametrize("sort_by", ["CreationTime", "Name", "Status"])
def test_pagination_over_250_jobs_for_each_sort(sagemaker: Any, seeded: dict[str, Any], sort_by: str,
                                                sort_order: str) -> None:
    # GIVEN 250 jobs and a page size of 40
    # WHEN every page is fetched with NextToken for this SortBy x SortOrder
    names, pages = list_all(sagemaker, 40, NameContains=seeded["tag"], SortBy=sort_by, SortOrder=sort_order)
    # THEN the concatenated pages are exactly the 250 jobs in the expected order (no duplicate, no miss)
    assert len(names) == len(set(names)) == 250
    assert names == expected_order(seeded["jobs"], sort_by, sort_order)
    assert pages >= 7


def test_boto3_paginator_and_default_sort(sagemaker: Any, seeded: dict[str, Any]) -> None:
    # GIVEN boto3's own paginator with small pages and no explicit sort
    paginator = sagemaker.get_paginator("list_compilation_jobs")
    # WHEN it walks every page
    names = [s["CompilationJobName"] for page in paginator.paginate(NameContains=seeded["tag"],
                                                                     PaginationConfig={"PageSize": 17})
             for s in page["CompilationJobSummaries"]]
    # THEN the default is SortBy=CreationTime, SortOrder=Ascending (as botocore's documentation of the
    # API states), complete and without duplicates
    assert names == expected_order(seeded["jobs"], "CreationTime", "Ascending")
    documentation = {member: shape.documentation for member, shape in
                     sagemaker.meta.service_model.operation_model("ListCompilationJobs").input_shape.members.items()}
    assert "The default is <code>Ascending</code>" in documentation["SortOrder"]
    assert "The default is <code>CreationTime</code>" in documentation["SortBy"]


def test_unfiltered_pages_walk_every_job_once(sagemaker: Any, seeded: dict[str, Any]) -> None:
    # GIVEN the whole table (the seeded jobs and every other test's), listed without any filter, so
    # each page is one index Query of MaxResults + 1 items
    paginator = sagemaker.get_paginator("list_compilation_jobs")
    # WHEN every page of 7 is fetched, newest first
    names = [s["CompilationJobName"] for page in paginator.paginate(SortOrder="Descending",
                                                                     PaginationConfig={"PageSize": 7})
             for s in page["CompilationJobSummaries"]]
    # THEN no job comes twice and the seeded ones all come, in their order
    assert len(names) == len(set(names))
    assert [n for n in names if seeded["tag"] in n] == expected_order(seeded["jobs"], "CreationTime", "Descending")


def test_default_sort_is_oldest_first_on_one_page(sagemaker: Any, seeded: dict[str, Any]) -> None:
    # GIVEN the seeded jobs  WHEN one page is listed without SortBy/SortOrder
    page = sagemaker.list_compilation_jobs(NameContains=seeded["tag"], MaxResults=5)["CompilationJobSummaries"]
    # THEN it holds the five oldest, oldest first
    assert [s["CompilationJobName"] for s in page] == expected_order(seeded["jobs"], "CreationTime", "Ascending")[:5]
    assert page[0]["CreationTime"] < page[-1]["CreationTime"]


@pytest.mark.parametrize("sort_by", ["CreationTime", "Name", "Status"])
def test_status_filter(sagemaker: Any, seeded: dict[str, Any], sort_by: str) -> None:
    # GIVEN 250 jobs in six statuses
    wanted = [j for j in seeded["jobs"] if j["CompilationJobStatus"] == "FAILED"]
    # WHEN listed with StatusEquals=FAILED (key condition for Status, filter otherwise)
    names, _ = list_all(sagemaker, 9, NameContains=seeded["tag"], StatusEquals="FAILED", SortBy=sort_by,
                        SortOrder="Ascending")
    # THEN exactly the failed ones, in order
    assert names == expected_order(wanted, sort_by, "Ascending")


@pytest.mark.parametrize("sort_by", ["CreationTime", "Name"])
def test_time_filters(sagemaker: Any, seeded: dict[str, Any], sort_by: str) -> None:
    # GIVEN creation times SEED_BASE + 10 i and modification times 5 s later
    low, high = SEED_BASE + 1000, SEED_BASE + 2000
    # WHEN listed with CreationTimeAfter/Before (exclusive bounds)
    names, _ = list_all(sagemaker, 25, NameContains=seeded["tag"], SortBy=sort_by, SortOrder="Ascending",
                        CreationTimeAfter=low, CreationTimeBefore=high)
    # THEN only jobs created strictly inside the window
    inside = [j for j in seeded["jobs"] if low < j["CreationTime"] < high]
    assert len(inside) == 99
    assert names == expected_order(inside, sort_by, "Ascending")
    # WHEN listed with LastModifiedTimeAfter/Before
    names, _ = list_all(sagemaker, 25, NameContains=seeded["tag"], SortBy=sort_by, SortOrder="Ascending",
                        LastModifiedTimeAfter=low, LastModifiedTimeBefore=high)
    # THEN only jobs modified inside the window
    modified = [j for j in seeded["jobs"] if low < j["LastModifiedTime"] < high]
    assert len(modified) == 100
    assert names == expected_order(modified, sort_by, "Ascending")


def test_name_contains_filter(sagemaker: Any, seeded: dict[str, Any]) -> None:
    # GIVEN 250 seeded jobs / WHEN listed by a substring of a few names / THEN exactly those jobs
    needle = f"{seeded['tag']}-12"
    names, _ = list_all(sagemaker, 100, NameContains=needle, SortBy="Name", SortOrder="Ascending")
    assert names == sorted(j["CompilationJobName"] for j in seeded["jobs"] if needle in j["CompilationJobName"])
    assert len(names) == 10


def _first_token(client: Any, tag: str, **filters: Any) -> str:
    page = client.list_compilation_jobs(NameContains=tag, MaxResults=10, **filters)
    return str(page["NextToken"])


def test_forged_and_altered_tokens_are_refused(sagemaker: Any, seeded: dict[str, Any]) -> None:
    # GIVEN a genuine token
    token = _first_token(sagemaker, seeded["tag"], SortBy="Name")
    payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["k"]["JobName"] = "zzzz"
    forged_payload = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    # WHEN forged or altered tokens are used with the same filters
    for bad in (f"{forged_payload}.{signature}", f"{payload}.{flipped}", payload, "garbage",
                base64.urlsafe_b64encode(b'{"k": {}, "f": "x"}').decode()):
        error = error_of(lambda bad=bad: sagemaker.list_compilation_jobs(
            NameContains=seeded["tag"], MaxResults=10, SortBy="Name", NextToken=bad))
        # THEN each is a ValidationException about the NextToken
        assert error["Code"] == "ValidationException" and "NextToken" in error["Message"]
    # AND the genuine token still works
    page = sagemaker.list_compilation_jobs(NameContains=seeded["tag"], MaxResults=10, SortBy="Name", NextToken=token)
    assert len(page["CompilationJobSummaries"]) == 10


@pytest.mark.parametrize("other", [
    {"SortBy": "CreationTime"}, {"SortBy": "Name", "SortOrder": "Descending"},
    {"SortBy": "Name", "StatusEquals": "FAILED"}, {"SortBy": "Name", "CreationTimeAfter": SEED_BASE},
    {"SortBy": "Name", "LastModifiedTimeBefore": SEED_BASE + 99999},
])
def test_token_reused_with_other_filters_is_refused(sagemaker: Any, seeded: dict[str, Any],
                                                    other: dict[str, Any]) -> None:
    # GIVEN a token issued for NameContains=tag, SortBy=Name (Ascending, the default)
    token = _first_token(sagemaker, seeded["tag"], SortBy="Name")
    # WHEN it is reused with another sort or filter
    error = error_of(lambda: sagemaker.list_compilation_jobs(NameContains=seeded["tag"], MaxResults=10,
                                                              NextToken=token, **other))
    # THEN ValidationException explains the token belongs to other filters
    assert error["Code"] == "ValidationException" and "other filters" in error["Message"]


def test_token_reused_with_another_page_size_is_accepted(sagemaker: Any, seeded: dict[str, Any]) -> None:
    # GIVEN a token from a 10-job page
    token = _first_token(sagemaker, seeded["tag"], SortBy="Name")
    # WHEN the next page is asked with MaxResults=15 / THEN it continues right after the first page
    page = sagemaker.list_compilation_jobs(NameContains=seeded["tag"], MaxResults=15, SortBy="Name", NextToken=token)
    expected = expected_order(seeded["jobs"], "Name", "Ascending")[10:25]
    assert [s["CompilationJobName"] for s in page["CompilationJobSummaries"]] == expected


# -- concurrency, limits, workflow start failure ------------------------------------------------------------
def test_fifty_concurrent_creates_of_one_name(api_server: Any, job_request: Callable[..., Any],
                                              unique: Callable[[str], str], sagemaker: Any) -> None:
    # GIVEN 50 clients (each its own boto3 client) ready to create the same job
    name = unique("race")
    request = job_request(name)
    config = botocore.config.Config(retries={"max_attempts": 1}, max_pool_connections=2)
    clients = [boto3.session.Session().client("sagemaker", endpoint_url=api_server.url, region_name="us-east-1",
                                              aws_access_key_id="t", aws_secret_access_key="t", config=config)
               for _ in range(50)]
    barrier = threading.Barrier(50)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(client: Any) -> None:
        barrier.wait()
        try:
            client.create_compilation_job(**request)
            outcome = "created"
        except ClientError as exc:
            outcome = exc.response["Error"]["Code"]
        with lock:
            outcomes.append(outcome)

    # WHEN they all create at once
    threads = [threading.Thread(target=create, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # THEN exactly one succeeds and 49 get ResourceInUse; one job exists
    assert sorted(outcomes) == ["ResourceInUse"] * 49 + ["created"]
    assert [s["CompilationJobName"] for s in
            sagemaker.list_compilation_jobs(NameContains=name)["CompilationJobSummaries"]] == [name]


def test_resource_limit_exceeded_at_the_configured_limit(sagemaker: Any, own_table: str,
                                                         reconfigured: Callable[..., Any],
                                                         job_request: Callable[..., Any],
                                                         unique: Callable[[str], str]) -> None:
    # GIVEN a deployment on its own table allowing 3 active jobs, with 3 active
    with reconfigured(table_name=own_table, max_active_jobs=3) as service:
        names = [unique("slot") for _ in range(3)]
        for name in names:
            service.store.create(record(name, SEED_BASE, "STARTING"))
        assert service.store.active_jobs() == 3
        # WHEN one more job is created through the API
        error = error_of(lambda: sagemaker.create_compilation_job(**job_request(unique("over"))))
        # THEN ResourceLimitExceeded names the limit, and nothing was stored
        assert error["Code"] == "ResourceLimitExceeded" and "3 active compilation jobs" in error["Message"]
        assert service.store.active_jobs() == 3
        # WHEN a job finishes, its slot is released / THEN a new job is accepted
        service.store.transition(names[0], "FAILED", allowed_from=("STARTING",))
        assert service.store.active_jobs() == 2
        service.store.create(record(unique("again"), SEED_BASE, "STARTING"))
        assert service.store.active_jobs() == 3


def test_only_active_records_take_a_slot(own_table: str, reconfigured: Callable[..., Any],
                                         unique: Callable[[str], str]) -> None:
    # GIVEN a deployment on its own table
    with reconfigured(table_name=own_table) as service:
        # WHEN one record of every finished status and one STARTING record are created through the store
        finished = [unique(status.lower()) for status in ("COMPLETED", "FAILED", "STOPPED")]
        for name, status in zip(finished, ("COMPLETED", "FAILED", "STOPPED"), strict=True):
            service.store.create(record(name, SEED_BASE, status))
        active = unique("active")
        service.store.create(record(active, SEED_BASE, "STARTING"))
        # THEN only the STARTING one holds a slot, and deleting the finished ones leaves the counter alone
        assert service.store.active_jobs() == 1
        for name in finished:
            service.store.delete(name)
        assert service.store.active_jobs() == 1
        # AND finishing the active one releases its slot
        service.store.transition(active, "FAILED", allowed_from=("STARTING",))
        assert service.store.active_jobs() == 0


def test_failed_workflow_start_is_recorded_failed(sagemaker: Any, reconfigured: Callable[..., Any],
                                                  own_table: str, job_request: Callable[..., Any],
                                                  unique: Callable[[str], str]) -> None:
    # GIVEN a deployment on its own table whose state machine ARN points nowhere
    bogus = f"arn:aws:states:us-east-1:{ACCOUNT}:stateMachine:kiln-does-not-exist"
    with reconfigured(state_machine_arn=bogus, table_name=own_table) as service:
        assert service.store.active_jobs() == 0
        name = unique("nostart")
        # WHEN a job is created
        response = sagemaker.create_compilation_job(**job_request(name))
        # THEN the create answers with the ARN, but the job is FAILED with a ServerError reason, not STARTING
        assert response["CompilationJobArn"].endswith(name)
        job = sagemaker.describe_compilation_job(CompilationJobName=name)
        assert job["CompilationJobStatus"] == "FAILED"
        assert job["FailureReason"].startswith("ServerError: the compilation workflow could not be started")
        assert "CompilationEndTime" in job
        # AND its active slot was released
        assert service.store.active_jobs() == 0


def test_target_of_a_runner_this_deployment_lacks_is_refused(sagemaker: Any, job_request: Callable[..., Any],
                                                             unique: Callable[[str], str],
                                                             reconfigured: Callable[..., Any]) -> None:
    # GIVEN a deployment with CPU compilers only (CDK context target_families=["cpu"])
    request = job_request(unique("gpu"))
    request["OutputConfig"]["TargetDevice"] = "ml_g4dn"
    with reconfigured(enabled_runners="fargate,batch-c4"):
        # WHEN a GPU target is asked for
        with pytest.raises(ClientError) as refused:
            sagemaker.create_compilation_job(**request)
        # THEN it is refused at create, naming the target and what is missing, and a CPU target still works
        request["CompilationJobName"] = unique("cpu")
        request["OutputConfig"]["TargetDevice"] = "ml_c4"
        assert sagemaker.create_compilation_job(**request)["CompilationJobArn"]
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "ml_g4dn" in refused.value.response["Error"]["Message"]
    assert "batch-gpu" in refused.value.response["Error"]["Message"]
