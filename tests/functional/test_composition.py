"""The composition root in local mode (settings injected, the environment untouched), and the wire
error of a tag update that keeps losing its race."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kiln import wiring
from kiln.handlers import registry as registry_handler
from kiln.local.moto_patches import _Context


def test_local_mode_injects_its_settings_and_leaves_the_environment_alone(local_stack: Any) -> None:
    # GIVEN the session's embedded stack, started by conftest without any KILN_* variable set
    # THEN this process's environment names none of its resources
    assert not [key for key in os.environ if key.startswith("KILN_") or key in ("MOTO_PORT", "AWS_ENDPOINT_URL")]
    # AND the one composition the handlers use holds the stack's settings
    kiln = wiring.current()
    assert kiln is local_stack.kiln
    assert kiln.settings.table_name == local_stack.outputs["TableName"]
    assert kiln.settings.state_machine_arn == local_stack.outputs["StateMachineArn"]
    assert kiln.service is kiln.workflow_steps._service is kiln.registry_hook._service  # built once, shared
    # AND a handler answers from it (an event the registry hook ignores)
    assert registry_handler.handler({"source": "x", "detail-type": "y"}, _Context()) == {"ignored": "x / y"}  # type: ignore[arg-type]


def test_reconfigured_serves_other_settings_then_restores(local_stack: Any) -> None:
    # GIVEN the stack's composition
    before = wiring.current()
    # WHEN the API is served with another limit inside a block
    with local_stack.reconfigured(max_active_jobs=3) as changed:
        # THEN the handlers see the new settings, and the workflow keeps the stack's steps
        assert wiring.current() is changed and changed.settings.max_active_jobs == 3
        assert changed.workflow_steps is before.workflow_steps
        assert changed.settings.table_name == before.settings.table_name
    # AND afterwards the stack's own composition is back
    assert wiring.current() is before


def test_add_tags_losing_every_race_is_a_conflict_exception(local_stack: Any, sagemaker: Any,
                                                            job_request: Callable[..., dict[str, Any]],
                                                            unique: Callable[[str], str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a stored job whose tags another writer changes between every read and write of AddTags
    service = local_stack.kiln.service
    name = unique("tag-race")
    service.store.create({**job_request(name), "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:"
                          f"compilation-job/{name}", "CompilationJobStatus": "FAILED", "CreationTime": 1.0,
                          "LastModifiedTime": 1.0, "Tags": [{"Key": "writer", "Value": "0"}]})
    table = local_stack.client("dynamodb")
    read = service.store.get
    writes = []

    def read_then_lose_the_race(job: str) -> dict[str, Any]:
        record = read(job)
        writes.append(job)
        table.update_item(TableName=local_stack.outputs["TableName"], Key={"JobName": {"S": job}},
                          UpdateExpression="SET Tags = :t", ExpressionAttributeValues={":t": {"L": [{"M": {
                              "Key": {"S": "writer"}, "Value": {"S": str(len(writes))}}}]}})
        return record

    monkeypatch.setattr(service.store, "get", read_then_lose_the_race)
    arn = f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}"
    # WHEN AddTags is called through the API
    with pytest.raises(sagemaker.exceptions.ConflictException) as conflict:
        sagemaker.add_tags(ResourceArn=arn, Tags=[{"Key": "team", "Value": "vision"}])
    # THEN botocore raises SageMaker's modeled ConflictException (HTTP 400) naming the job; it retried 5 times
    error: ClientError = conflict.value
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert name in error.response["Error"]["Message"] and "retry" in error.response["Error"]["Message"]
    assert writes.count(name) >= 5
    # AND the ConflictException is in SageMaker's model (what botocore maps the code to)
    assert "ConflictException" in sagemaker.meta.service_model.shape_names
    # AND DeleteTags under the same race answers the same
    with pytest.raises(sagemaker.exceptions.ConflictException):
        sagemaker.delete_tags(ResourceArn=arn, TagKeys=["writer"])


def test_imported_records_are_listed_without_taking_active_slots(sagemaker: Any, own_table: str,
                                                                 reconfigured: Callable[..., Any],
                                                                 job_request: Callable[..., dict[str, Any]],
                                                                 unique: Callable[[str], str]) -> None:
    # GIVEN three finished job records bulk-loaded through the store of a deployment on its own table
    with reconfigured(table_name=own_table) as service:
        tag = unique("imported")
        records = [{**job_request(f"{tag}-{i}"), "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:"
                    f"compilation-job/{tag}-{i}", "CompilationJobStatus": status, "CreationTime": 1_000.0 + i,
                    "LastModifiedTime": 1_000.0 + i}
                   for i, status in enumerate(("COMPLETED", "FAILED", "STOPPED"))]
        assert service.store.import_records(iter(records)) == 3
        # WHEN they are listed through the API / THEN all three appear, oldest first, and no slot was taken
        listed = sagemaker.list_compilation_jobs(NameContains=tag)["CompilationJobSummaries"]
        assert [s["CompilationJobName"] for s in listed] == [f"{tag}-{i}" for i in range(3)]
        assert service.store.active_jobs() == 0
        # AND an active record is refused
        with pytest.raises(ValueError, match="only finished jobs"):
            service.store.import_records([{**records[0], "CompilationJobStatus": "INPROGRESS"}])
