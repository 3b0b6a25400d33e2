"""The job store: compilation-job records in DynamoDB.

Layout (one item per job, key ``JobName``), plus:

* a counter item (``JobName = "#active"``; '#' cannot appear in a job name) holding the number
  of active jobs, changed in the same transaction as the job, so the active-job limit holds
  under concurrency;
* three global secondary indexes on the constant partition ``Partition = "job"`` that serve
  every ``ListCompilationJobs`` sort without a Scan: ``ByCreationTime`` (CreationTime),
  ``ByName`` (JobName) and ``ByStatus`` (StatusKey = "STATUS#creation-time#name").

Every status change is a conditional write: terminal states are final and no update is lost.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import boto3
from boto3.dynamodb.conditions import Attr, ConditionBase, Key
from botocore.exceptions import ClientError

from kiln.errors import (
    TRANSIENT_CANCELLATION_REASONS,
    ConflictError,
    ResourceInUse,
    ResourceLimitExceeded,
    ResourceNotFound,
    ValidationError,
)

TERMINAL = ("COMPLETED", "FAILED", "STOPPED")
ACTIVE = ("STARTING", "INPROGRESS", "STOPPING")
PARTITION = "job"
COUNTER_KEY = "#active"
# A transaction cancelled for these reasons changed nothing and may be retried (not a lost race).

INDEXES = {
    "ByCreationTime": ("CreationTime", "N"),
    "ByName": ("JobName", "S"),
    "ByStatus": ("StatusKey", "S"),
}
_SORT_INDEX = {"CreationTime": "ByCreationTime", "Name": "ByName", "Status": "ByStatus"}
_INTERNAL = ("Partition", "StatusKey", "Tags", "ExecutionArn", "Runner", "Internal")
# What a listing reads of each record (ListCompilationJobs' summaries, the census's limits) and the
# index keys a NextToken holds: a page moves these, not whole records.
LISTED_ATTRIBUTES = ("JobName", "Partition", "StatusKey", "CompilationJobName", "CompilationJobArn",
                     "CompilationJobStatus", "CreationTime", "LastModifiedTime", "CompilationStartTime",
                     "CompilationEndTime", "OutputConfig", "StoppingCondition")


def table_definition(name: str) -> dict[str, Any]:
    """The CreateTable arguments for the job table (the local stack uses it; CDK mirrors it)."""
    attributes = [{"AttributeName": "JobName", "AttributeType": "S"},
                  {"AttributeName": "Partition", "AttributeType": "S"},
                  {"AttributeName": "CreationTime", "AttributeType": "N"},
                  {"AttributeName": "StatusKey", "AttributeType": "S"}]
    return {
        "TableName": name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": attributes,
        "KeySchema": [{"AttributeName": "JobName", "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [
            {"IndexName": index,
             "KeySchema": [{"AttributeName": "Partition", "KeyType": "HASH"},
                           {"AttributeName": sort_key, "KeyType": "RANGE"}],
             "Projection": {"ProjectionType": "ALL"}}
            for index, (sort_key, _) in INDEXES.items()
        ],
    }


def _to_dynamo(value: Any) -> Any:
    return json.loads(json.dumps(value), parse_float=Decimal)


def _from_dynamo(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and "." not in str(value) else float(value)
    if isinstance(value, dict):
        return {k: _from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_dynamo(v) for v in value]
    return value


def _status_key(status: str, created: float, name: str) -> str:
    return f"{status}#{created:017.6f}#{name}"


@dataclass(frozen=True)
class ListQuery:
    """A validated ListCompilationJobs request."""

    sort_by: str = "CreationTime"
    sort_order: str = "Ascending"
    max_results: int = 10
    name_contains: str | None = None
    status_equals: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    modified_after: float | None = None
    modified_before: float | None = None

    def fingerprint(self) -> str:
        """What a NextToken is bound to: every filter and sort, not the page size."""
        fields = {k: v for k, v in self.__dict__.items() if k != "max_results"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class JobStore:
    """Compilation-job records: conditional create, guarded transitions, indexed listing, tags."""

    def __init__(self, table_name: str, *, pagination_key: str, max_active_jobs: int,
                 dynamodb: Any | None = None) -> None:
        resource = dynamodb or boto3.resource("dynamodb")
        self._table = resource.Table(table_name)
        self._client = self._table.meta.client
        self._table_name = table_name
        self._key = pagination_key.encode()
        self._max_active = max_active_jobs

    # -- create ------------------------------------------------------------------------------
    def create(self, job: dict[str, Any], *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Insert a new job (the API creates STARTING ones); ``ResourceInUse`` if the name exists,
        ``ResourceLimitExceeded`` if the job is active and the active-job limit is reached. Both
        checks are one DynamoDB transaction. Only an active job takes a slot, so the counter always
        equals the number of active records."""
        name = job["CompilationJobName"]
        item = {**job, **(extra or {}), "JobName": name, "Partition": PARTITION,
                "StatusKey": _status_key(job["CompilationJobStatus"], job["CreationTime"], name)}
        items: list[dict[str, Any]] = [{"Put": {"TableName": self._table_name, "Item": _to_dynamo(item),
                                                "ConditionExpression": "attribute_not_exists(JobName)"}}]
        if job["CompilationJobStatus"] not in TERMINAL:
            items.append({"Update": {"TableName": self._table_name, "Key": {"JobName": COUNTER_KEY},
                                     "UpdateExpression": "ADD ActiveJobs :one",
                                     "ConditionExpression": "attribute_not_exists(ActiveJobs) OR ActiveJobs < :max",
                                     "ExpressionAttributeValues": {":one": 1, ":max": self._max_active}}})
        try:
            self._client.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
            if reasons and reasons[0] == "ConditionalCheckFailed":
                raise ResourceInUse(f"Compilation job {name} already exists") from None
            if len(reasons) > 1 and reasons[1] == "ConditionalCheckFailed":
                raise ResourceLimitExceeded(
                    f"The account has reached its limit of {self._max_active} active compilation jobs; "
                    "wait for a job to finish or stop one") from None
            raise
        return job

    def import_records(self, jobs: Iterable[dict[str, Any]]) -> int:
        """Bulk-load finished (COMPLETED/FAILED/STOPPED) job records, as ``create`` lays them out but
        without the name check and the active-job counter (benchmarks, migrations); how many."""
        count = 0
        with self._table.batch_writer(overwrite_by_pkeys=["JobName"]) as batch:
            for job in jobs:
                if job["CompilationJobStatus"] not in TERMINAL:
                    raise ValueError(f"only finished jobs can be imported, not {job['CompilationJobStatus']}")
                name = job["CompilationJobName"]
                batch.put_item(Item=_to_dynamo({**job, "JobName": name, "Partition": PARTITION,
                                                "StatusKey": _status_key(job["CompilationJobStatus"],
                                                                         job["CreationTime"], name)}))
                count += 1
        return count

    # -- read --------------------------------------------------------------------------------
    def get(self, name: str) -> dict[str, Any]:
        """The stored record (public members plus internal ones); ``ResourceNotFound`` if absent."""
        item = self._table.get_item(Key={"JobName": name}, ConsistentRead=True).get("Item")
        if not item or name == COUNTER_KEY:
            raise ResourceNotFound(f"Could not find compilation job '{name}'")
        return _from_dynamo(item)

    def active_jobs(self) -> int:
        item = self._table.get_item(Key={"JobName": COUNTER_KEY}, ConsistentRead=True).get("Item") or {}
        return int(item.get("ActiveJobs", 0))

    # -- transitions -------------------------------------------------------------------------
    def transition(self, name: str, to_status: str, *, allowed_from: Iterable[str],
                   updates: dict[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
        """Move a job to ``to_status`` if it is in one of ``allowed_from``; ``ConflictError`` otherwise.

        Leaving the active set releases the job's slot in the same transaction."""
        allowed = tuple(allowed_from)
        current = self.get(name)
        if current["CompilationJobStatus"] not in allowed:
            raise ConflictError(f"Job {name} is {current['CompilationJobStatus']}, not one of {', '.join(allowed)}")
        now = now if now is not None else time.time()
        values: dict[str, Any] = {**(updates or {}), "CompilationJobStatus": to_status, "LastModifiedTime": now,
                                  "StatusKey": _status_key(to_status, current["CreationTime"], name)}
        names = {f"#f{i}": k for i, k in enumerate(values)}
        expression = "SET " + ", ".join(f"#f{i} = :v{i}" for i in range(len(values)))
        attr_values = {f":v{i}": v for i, v in enumerate(values.values())}
        condition = "#s IN (" + ", ".join(f":from{i}" for i in range(len(allowed))) + ")"
        names["#s"] = "CompilationJobStatus"
        attr_values.update({f":from{i}": s for i, s in enumerate(allowed)})
        update: dict[str, Any] = {
            "TableName": self._table_name, "Key": {"JobName": name},
            "UpdateExpression": expression, "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": _to_dynamo(attr_values),
        }
        items: list[dict[str, Any]] = [{"Update": update}]
        if to_status in TERMINAL:
            items.append({"Update": {"TableName": self._table_name, "Key": {"JobName": COUNTER_KEY},
                                     "UpdateExpression": "ADD ActiveJobs :minus",
                                     "ExpressionAttributeValues": {":minus": -1}}})
        try:
            self._client.transact_write_items(TransactItems=items)
        except ClientError as exc:
            reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])}
            if exc.response["Error"]["Code"] == "TransactionCanceledException" and (
                    "ConditionalCheckFailed" in reasons or not reasons & TRANSIENT_CANCELLATION_REASONS):
                raise ConflictError(f"Job {name} changed while moving to {to_status}") from None
            raise  # a TransactionConflict or throttling: nothing changed, the caller may retry
        return {**current, **values}

    def set_fields(self, name: str, fields: dict[str, Any]) -> None:
        """Set non-status fields on an existing job (e.g. the execution ARN)."""
        names = {f"#f{i}": k for i, k in enumerate(fields)}
        values = {f":v{i}": v for i, v in enumerate(fields.values())}
        self._table.update_item(
            Key={"JobName": name}, UpdateExpression="SET " + ", ".join(f"#f{i} = :v{i}" for i in range(len(fields))),
            ConditionExpression=Attr("JobName").exists(), ExpressionAttributeNames=names,
            ExpressionAttributeValues=_to_dynamo(values))

    # -- delete ------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Delete a job in a terminal state (``ValidationError`` otherwise)."""
        job = self.get(name)
        try:
            self._table.delete_item(Key={"JobName": name},
                                    ConditionExpression=Attr("CompilationJobStatus").is_in(list(TERMINAL)))
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise ValidationError(
                    f"Compilation job {name} is {job['CompilationJobStatus']}; only COMPLETED, FAILED or STOPPED "
                    "jobs can be deleted. Stop it first.") from None
            raise

    # -- tags --------------------------------------------------------------------------------
    def add_tags(self, name: str, tags: list[dict[str, str]]) -> list[dict[str, str]]:
        """Add or replace tags (50 per resource at most)."""
        for _ in range(5):  # optimistic concurrency: retry on a concurrent tag change
            job = self.get(name)
            current = job.get("Tags", [])
            merged = {t["Key"]: t["Value"] for t in current}
            merged.update({t["Key"]: t.get("Value", "") for t in tags})
            if len(merged) > 50:
                raise ValidationError(f"Compilation job {name} would have {len(merged)} tags; at most 50 are allowed")
            new = [{"Key": k, "Value": v} for k, v in merged.items()]
            if self._replace_tags(name, current, new):
                return new
        raise ConflictError(f"Tags of {name} kept changing; retry")

    def delete_tags(self, name: str, keys: list[str]) -> None:
        for _ in range(5):
            current = self.get(name).get("Tags", [])
            if self._replace_tags(name, current, [t for t in current if t["Key"] not in set(keys)]):
                return
        raise ConflictError(f"Tags of {name} kept changing; retry")

    def _replace_tags(self, name: str, old: list[dict[str, str]], new: list[dict[str, str]]) -> bool:
        condition: ConditionBase = Attr("JobName").exists() & (
            Attr("Tags").eq(old) if old else (Attr("Tags").not_exists() | Attr("Tags").eq([])))
        try:
            self._table.update_item(Key={"JobName": name}, UpdateExpression="SET Tags = :t",
                                    ConditionExpression=condition, ExpressionAttributeValues={":t": new})
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True

    # -- list --------------------------------------------------------------------------------
    def list(self, query: ListQuery, next_token: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of jobs matching ``query`` and the token of the next page (None at the end)."""
        start_key = self._decode_token(next_token, query) if next_token else None
        index = _SORT_INDEX[query.sort_by]
        key_condition: ConditionBase = Key("Partition").eq(PARTITION)
        if index == "ByCreationTime" and (query.created_after is not None or query.created_before is not None):
            low = query.created_after if query.created_after is not None else 0.0
            high = query.created_before if query.created_before is not None else 1e12
            if low > high:  # an empty window (DynamoDB refuses BETWEEN with bounds reversed)
                return [], None
            key_condition = key_condition & Key("CreationTime").between(_to_dynamo(low), _to_dynamo(high))
        if index == "ByStatus" and query.status_equals:
            key_condition = key_condition & Key("StatusKey").begins_with(query.status_equals + "#")
        filters = self._filters(query)
        # Unfiltered, one item past the page tells whether more follow; a filter may drop items.
        limit = query.max_results + 1 if filters is None else max(query.max_results * 2, 25)
        projection = {"ProjectionExpression": ", ".join(f"#p{i}" for i in range(len(LISTED_ATTRIBUTES))),
                      "ExpressionAttributeNames": {f"#p{i}": name for i, name in enumerate(LISTED_ATTRIBUTES)}}
        results: list[dict[str, Any]] = []
        while True:
            kwargs: dict[str, Any] = {"IndexName": index, "KeyConditionExpression": key_condition,
                                      "ScanIndexForward": query.sort_order == "Ascending", "Limit": limit,
                                      **projection}
            if filters is not None:
                kwargs["FilterExpression"] = filters
            if start_key:
                kwargs["ExclusiveStartKey"] = start_key
            page = self._table.query(**kwargs)
            for item in page.get("Items", []):
                results.append(_from_dynamo(item))
                if len(results) == query.max_results:
                    last = results[-1]
                    following = self._key_of(last, index)
                    # A token only if more may follow (DynamoDB has more, or this page had more).
                    more = "LastEvaluatedKey" in page or item is not page["Items"][-1]
                    return results, (self._encode_token(following, query) if more else None)
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return results, None

    @staticmethod
    def _filters(query: ListQuery) -> ConditionBase | None:
        parts: list[ConditionBase] = []
        if query.name_contains:
            parts.append(Attr("JobName").contains(query.name_contains))
        if query.status_equals and query.sort_by != "Status":
            parts.append(Attr("CompilationJobStatus").eq(query.status_equals))
        if query.created_after is not None:
            parts.append(Attr("CreationTime").gt(_to_dynamo(query.created_after)))
        if query.created_before is not None:
            parts.append(Attr("CreationTime").lt(_to_dynamo(query.created_before)))
        if query.modified_after is not None:
            parts.append(Attr("LastModifiedTime").gt(_to_dynamo(query.modified_after)))
        if query.modified_before is not None:
            parts.append(Attr("LastModifiedTime").lt(_to_dynamo(query.modified_before)))
        if not parts:
            return None
        combined = parts[0]
        for part in parts[1:]:
            combined = combined & part
        return combined

    @staticmethod
    def _key_of(item: dict[str, Any], index: str) -> dict[str, Any]:
        sort_key = INDEXES[index][0]
        return _to_dynamo({"JobName": item["JobName"], "Partition": PARTITION, sort_key: item[sort_key]})

    def _encode_token(self, key: dict[str, Any], query: ListQuery) -> str:
        body = json.dumps({"k": _from_dynamo(key), "f": query.fingerprint()}, separators=(",", ":"), sort_keys=True)
        payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
        signature = hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{payload}.{signature}"

    def _decode_token(self, token: str, query: ListQuery) -> dict[str, Any]:
        invalid = ValidationError("The NextToken is invalid: it was not issued by this service or was altered")
        payload, _, signature = token.partition(".")
        expected = hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()[:32]
        if not signature or not hmac.compare_digest(signature, expected):
            raise invalid
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            raise invalid from None
        if body.get("f") != query.fingerprint():
            raise ValidationError("The NextToken was issued for a request with other filters or sort order; "
                                  "repeat the original filters or start again without a NextToken")
        return _to_dynamo(body["k"])


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """A job record without the store's internal attributes."""
    return {k: v for k, v in record.items() if k not in _INTERNAL and k != "JobName"}
