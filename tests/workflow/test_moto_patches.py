"""The moto workarounds stay needed; when upstream fixes one, this fails and the patch can go."""

from __future__ import annotations

import json

from kiln.local import moto_patches
from kiln.local.stack import render_definition


def test_each_moto_workaround_is_still_needed():
    # GIVEN moto's own code (the originals, whether or not the patches are applied)
    # WHEN each known defect is looked for
    status = moto_patches.upstream_still_needs_patches()
    # THEN every defect is still there (a False means upstream fixed it: delete that patch and this key)
    assert status == {"normalisation": True, "failure_cause": True, "heartbeat_timeout_name": True,
                      "first_answer_wins": True, "dynamodb_atomic_writes": True}


def test_ecs_parameters_are_normalised_once_patched():
    # GIVEN the patch applied
    moto_patches.patch_service_normalisation()
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
        StateTaskServiceEcs,
    )

    service = object.__new__(StateTaskServiceEcs)
    params = {"Cluster": "kiln", "Overrides": {"ContainerOverrides": [{"Name": "compiler", "Environment": [
        {"Name": "A", "Value": "b"}]}]}}
    # WHEN Step Functions-cased RunTask parameters are normalised
    service._normalise_parameters(params, "ecs", "run_task")
    # THEN they are botocore-cased, all the way down
    assert params == {"cluster": "kiln", "overrides": {"containerOverrides": [
        {"name": "compiler", "environment": [{"name": "A", "value": "b"}]}]}}


def test_definition_placeholders_must_all_be_filled():
    # GIVEN the workflow file WHEN rendered with every placeholder THEN it is valid JSON with no placeholder
    names = ["WorkflowFunctionArn", "ClusterArn", "CpuTaskDefinitionArn", "CompilerContainerName"]
    definition = json.loads(render_definition({n: f"arn:{n}" for n in names}))
    assert definition["States"]["CompileOnFargate"]["Parameters"]["Cluster"] == "arn:ClusterArn"
    # AND a missing one is refused
    try:
        render_definition({n: "x" for n in names[1:]})
    except ValueError as exc:
        assert "WorkflowFunctionArn" in str(exc)
    else:
        raise AssertionError("a missing placeholder was not reported")


def test_batch_job_lives_as_long_as_its_local_process(local_stack):
    # GIVEN two jobs submitted to a family's Batch queue (no KILN_JOB: the local runner starts no process)
    from kiln.local import moto_patches

    from tests.workflow.conftest import wait_until

    batch = local_stack.client("batch")
    queue, definition = "kiln-batch-c5", "kiln-compiler-batch-c5"
    ended = batch.submit_job(jobName="ends", jobQueue=queue, jobDefinition=definition)
    killed = batch.submit_job(jobName="killed", jobQueue=queue, jobDefinition=definition)

    def status(job):
        return batch.describe_jobs(jobs=[job["jobId"]])["jobs"][0]["status"]

    # THEN each stays RUNNING (moto alone would try Docker and fail it at once)
    assert wait_until(lambda: status(ended) == "RUNNING" and status(killed) == "RUNNING", timeout=10)
    # WHEN one's process exits and the other is terminated
    moto_patches.batch_container_exited(ended["jobArn"])
    batch.terminate_job(jobId=killed["jobId"], reason="test")
    # THEN the first SUCCEEDED and the second FAILED, as Batch reports them
    assert wait_until(lambda: status(ended) == "SUCCEEDED", timeout=10)
    assert wait_until(lambda: status(killed) == "FAILED", timeout=10)


def test_fast_dynamodb_reads_write_the_bytes_moto_would(local_stack):
    # GIVEN an item holding every DynamoDB type, read back through the embedded endpoint
    import base64

    from moto.core.responses import ActionContext, BaseResponse
    from moto.core.serialize import get_serializer_class
    from moto.core.utils import get_service_model
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.responses import DynamoResult

    item = {"JobName": {"S": "every-type"}, "n": {"N": "1.5"}, "b": {"B": base64.b64encode(b"\x00\xff").decode()},
            "t": {"BOOL": True}, "z": {"NULL": True}, "m": {"M": {"s": {"S": "é"}, "l": {"L": [{"N": "2"}]}}},
            "ss": {"SS": ["a", "b"]}, "ns": {"NS": ["1", "2"]}, "bs": {"BS": [base64.b64encode(b"x").decode()]}}
    model = get_service_model("dynamodb")
    results = {"GetItem": {"Item": {k: DynamoType(v) for k, v in item.items()}},
               "Query": {"Count": 1, "ScannedCount": 3, "Items": [{k: DynamoType(v) for k, v in item.items()}],
                         "LastEvaluatedKey": {"JobName": DynamoType({"S": "every-type"})}},
               "Scan": {"Count": 0, "ScannedCount": 0, "Items": []}}
    for operation, result in results.items():
        context = ActionContext(model, model.operation_model(operation), get_serializer_class("dynamodb", "json"),
                                BaseResponse("dynamodb"))  # the serialiser reads no request state
        # WHEN the patched and moto's own serialiser write the same result
        patched = DynamoResult(result).execute_result(context)
        unpatched = DynamoResult.__new__(DynamoResult)
        moto_patches._originals["dynamodb_result_init"](unpatched, result)  # moto's copy into plain values
        original = moto_patches._originals["dynamodb_execute_result"](unpatched, context)
        # THEN status, content type and the JSON document are the same
        assert patched[0] == original[0] == 200
        assert patched[1]["Content-Type"] == original[1]["Content-Type"]
        assert json.loads(patched[2]) == json.loads(original[2]), operation


def test_moto_lists_its_modules_once_patched(local_stack):
    # GIVEN the embedded stack (patch applied) WHEN moto's server asks for its service modules
    from moto import backends

    # THEN it gets the same list as moto's own, without listing the package folder again
    assert list(backends.list_of_moto_modules()) == list(moto_patches._originals["list_of_moto_modules"]())
    assert "dynamodb" in backends.list_of_moto_modules()


def test_moto_lists_a_response_class_methods_once_patched(local_stack):
    # GIVEN the embedded stack (patch applied) WHEN moto's dispatch asks for a response class's methods
    from moto.core import responses
    from moto.dynamodb.responses import DynamoHandler
    from moto.stepfunctions.responses import StepFunctionResponse

    original = moto_patches._originals["method_names_from_class"]
    for clazz in (DynamoHandler, StepFunctionResponse):
        # THEN it gets moto's own names, the same object on the next request (not listed again)
        assert set(responses.method_names_from_class(clazz)) == set(original(clazz))
        assert responses.method_names_from_class(clazz) is responses.method_names_from_class(clazz)
    assert "get_item" in responses.method_names_from_class(DynamoHandler)


def test_cancelled_transaction_rolls_back_only_its_items(local_stack):
    # GIVEN a table of its own holding two items
    from botocore.exceptions import ClientError

    dynamodb = local_stack.client("dynamodb")
    table = "kiln-transaction-rollback"
    dynamodb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                          AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
                          KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}])
    dynamodb.put_item(TableName=table, Item={"k": {"S": "changed"}, "v": {"N": "1"}, "m": {"M": {"x": {"S": "a"}}}})
    dynamodb.put_item(TableName=table, Item={"k": {"S": "other"}, "v": {"N": "7"}})
    # WHEN a transaction puts a new item, updates one in place, then fails its last condition
    try:
        dynamodb.transact_write_items(TransactItems=[
            {"Put": {"TableName": table, "Item": {"k": {"S": "new"}}}},
            {"Update": {"TableName": table, "Key": {"k": {"S": "changed"}}, "UpdateExpression": "SET v = :v, m.x = :x",
                        "ExpressionAttributeValues": {":v": {"N": "2"}, ":x": {"S": "b"}}}},
            {"ConditionCheck": {"TableName": table, "Key": {"k": {"S": "other"}},
                                "ConditionExpression": "attribute_not_exists(k)"}}])
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "TransactionCanceledException"
    else:
        raise AssertionError("the transaction's failed condition did not cancel it")
    # THEN none of its writes remain and the untouched item is as it was
    items = {i["k"]["S"]: i for i in dynamodb.scan(TableName=table, ConsistentRead=True)["Items"]}
    assert set(items) == {"changed", "other"}
    assert items["changed"]["v"] == {"N": "1"} and items["changed"]["m"] == {"M": {"x": {"S": "a"}}}
    assert items["other"]["v"] == {"N": "7"}
    # AND a transaction that succeeds keeps all its writes
    dynamodb.transact_write_items(TransactItems=[
        {"Put": {"TableName": table, "Item": {"k": {"S": "new"}}}},
        {"Update": {"TableName": table, "Key": {"k": {"S": "changed"}}, "UpdateExpression": "SET v = :v",
                    "ExpressionAttributeValues": {":v": {"N": "3"}}}}])
    items = {i["k"]["S"]: i for i in dynamodb.scan(TableName=table, ConsistentRead=True)["Items"]}
    assert set(items) == {"changed", "other", "new"} and items["changed"]["v"] == {"N": "3"}
    dynamodb.delete_table(TableName=table)


def test_projection_on_top_level_names_reads_what_moto_would(local_stack):
    # GIVEN an item with nested and missing attributes
    from moto.dynamodb.models.dynamo_type import DynamoType, Item

    item = Item(hash_key=DynamoType({"S": "job"}), range_key=None,
                attrs={"JobName": {"S": "job"}, "OutputConfig": {"M": {"TargetDevice": {"S": "ml_c5"},
                                                                      "Tags": {"L": [{"N": "1"}, {"S": "x"}]}}},
                       "CreationTime": {"N": "1796130066.25"}, "Internal": {"M": {"big": {"S": "x" * 1000}}},
                       "Flags": {"SS": ["a", "b"]}})
    for paths in ([["JobName"], ["OutputConfig"], ["CreationTime"], ["Flags"], ["Missing"]],
                  [["OutputConfig", "TargetDevice"], ["JobName"]]):
        # WHEN it is projected by the patched and moto's own method
        patched = item.project(paths)
        original = moto_patches._originals["dynamodb_project"](item, paths)
        # THEN both hold the same attributes and values (sets compared as sets; nested paths are
        # moto's own way)
        assert patched.to_regular_json() == original.to_regular_json(), paths
        assert set(patched.attrs) == set(original.attrs)
        assert "Internal" not in patched.attrs


def test_dynamodb_reads_leave_no_items_behind(local_stack):
    # GIVEN a table of 20 items on the embedded endpoint (patched: items are not tracked by moto)
    from moto.dynamodb.models.dynamo_type import Item

    dynamodb = local_stack.client("dynamodb")
    table = "kiln-test-untracked"
    dynamodb.create_table(TableName=table, KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
                          AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
                          BillingMode="PAY_PER_REQUEST")
    for index in range(20):
        dynamodb.put_item(TableName=table, Item={"k": {"S": f"item-{index:02d}"}, "v": {"M": {"n": {"N": str(index)}}}})
    tracked = len(Item.instances_tracked)  # type: ignore[attr-defined]
    # WHEN it is read 30 times over (Scan copies and returns every item, GetItem one)
    for _ in range(30):
        scanned = dynamodb.scan(TableName=table)["Items"]
        got = dynamodb.get_item(TableName=table, Key={"k": {"S": "item-07"}})["Item"]
    # THEN the reads still return the items, and moto kept none of the copies it built for them
    # (unpatched: 630 more, held until a reset)
    assert len(scanned) == 20 and got["v"] == {"M": {"n": {"N": "7"}}}
    assert len(Item.instances_tracked) == tracked  # type: ignore[attr-defined]
    dynamodb.delete_table(TableName=table)


def test_a_definition_is_parsed_once_and_each_execution_gets_its_own_states(local_stack, monkeypatch):
    # GIVEN the stack's state machine definition (patched: parsed when the state machine was created)
    import inspect

    import pytest
    from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser, ASLParserException
    from moto.stepfunctions.parser.backend.execution_worker import ExecutionWorker

    sfn = local_stack.client("stepfunctions")
    definition = sfn.describe_state_machine(stateMachineArn=local_stack.outputs["StateMachineArn"])["definition"]
    # WHEN two executions parse it
    first, first_tree = AmazonStateLanguageParser.parse(definition)
    second, second_tree = AmazonStateLanguageParser.parse(definition)
    # THEN they share one parse tree but not the states built from it (those hold per-execution state)
    assert first_tree is second_tree and first is not second
    # AND the states are those moto's own parse builds, down to every field (object addresses aside)
    import re

    from antlr4.RuleContext import RuleContext

    original, _ = moto_patches._originals["sfn_parse"](definition)
    assert list(first.states.states) == list(original.states.states) == list(json.loads(definition)["States"])

    def described(program):
        return re.sub(r" at 0x[0-9a-f]+", "", repr(program.states.states))

    assert described(first) == described(original)
    # AND building them reads each rule node's text kept on the tree, never ANTLR's re-join of the
    # node's subtree (moto's preprocessor asks ~3,800 times per execution)
    joined = []
    with monkeypatch.context() as counting:
        text = RuleContext.getText
        counting.setattr(RuleContext, "getText", lambda node: joined.append(node) or text(node))
        AmazonStateLanguageParser.parse(definition)
    assert joined and all(getattr(node, "_kiln_text", None) is not None for node in joined)
    # AND a definition that does not parse is refused every time, as by moto
    for _ in range(2):
        with pytest.raises(ASLParserException):
            AmazonStateLanguageParser.parse('{"StartAt": "A", "States": {"A": {"Type": "Nope"}}}')
    # AND moto still parses for every execution it starts (when it stops, the patch can go)
    assert "AmazonStateLanguageParser.parse" in inspect.getsource(ExecutionWorker._get_evaluation_entrypoint)


def _create_indexed_table(dynamodb, table: str) -> None:
    """A table keyed (p, r) with an index ByV over (g, v) projecting all attributes."""
    dynamodb.create_table(
        TableName=table, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "p", "KeyType": "HASH"}, {"AttributeName": "r", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": t} for n, t in
                              (("p", "S"), ("r", "S"), ("g", "S"), ("v", "N"))],
        GlobalSecondaryIndexes=[{"IndexName": "ByV", "Projection": {"ProjectionType": "ALL"},
                                 "KeySchema": [{"AttributeName": "g", "KeyType": "HASH"},
                                               {"AttributeName": "v", "KeyType": "RANGE"}]}])


def test_projected_queries_page_filter_and_return_copies(local_stack):
    # GIVEN a table with a sort key and an index of all attributes, 30 items with a large attribute
    from moto.dynamodb.models import dynamodb_backends
    from moto.dynamodb.models.dynamo_type import DynamoType

    dynamodb = local_stack.client("dynamodb")
    table = "kiln-test-query-copies"
    _create_indexed_table(dynamodb, table)
    for i in range(30):
        dynamodb.put_item(TableName=table, Item={
            "p": {"S": "all"}, "r": {"S": f"r{i:02d}"}, "g": {"S": "g"}, "v": {"N": str(i)},
            "a": {"S": f"a{i}"}, "big": {"M": {"text": {"S": "x" * 2000}, "list": {"L": [{"N": str(i)}]}}}})
    query = {"TableName": table, "IndexName": "ByV", "KeyConditionExpression": "g = :g",
             "ExpressionAttributeValues": {":g": {"S": "g"}}, "ProjectionExpression": "r, a, v",
             "ScanIndexForward": False, "Limit": 10}
    # WHEN it is queried by the index with a projection, page by page
    first = dynamodb.query(**query)
    second = dynamodb.query(**query, ExclusiveStartKey=first["LastEvaluatedKey"])
    # THEN each page holds the projected attributes of the right items, in order
    expected = [{"r": {"S": f"r{i:02d}"}, "a": {"S": f"a{i}"}, "v": {"N": str(i)}} for i in range(29, -1, -1)]
    assert first["Items"] + second["Items"] == expected[:20] and first["Count"] == second["Count"] == 10
    # AND with a filter on an attribute the projection leaves out, the filter still sees it
    filtered = dynamodb.query(**{**query, "Limit": 30, "ExpressionAttributeValues": {
        ":g": {"S": "g"}, ":one": {"N": "1"}, ":five": {"N": "5"}}},
        FilterExpression="size(big.#l) = :one AND v < :five", ExpressionAttributeNames={"#l": "list"})
    assert filtered["Items"] == expected[25:]
    # AND what a query returns is a copy: changing it leaves the stored item as it was
    backend = dynamodb_backends[local_stack.outputs["JobRoleArn"].split(":")[4]]["us-east-1"].get_table(table)
    results, _, _ = backend.query(DynamoType({"S": "all"}), None, [], 5, None, True, [["a"], ["big"]])
    results[0].attrs["a"].value = "changed"
    assert backend.get_item(DynamoType({"S": "all"}), DynamoType({"S": "r00"})).attrs["a"].value == "a0"
    assert set(results[0].attrs) == {"a", "big"}
    dynamodb.delete_table(TableName=table)


def test_queries_size_once_copy_projected_names_and_answer_as_moto(local_stack, monkeypatch):
    # GIVEN a table with a sort key and an index of all attributes, 12 items with a large attribute
    import copy

    from moto.dynamodb.models import table as table_module
    from moto.dynamodb.models.dynamo_type import DynamoType, Item
    from moto.dynamodb.models.table import Table

    dynamodb = local_stack.client("dynamodb")
    table = "kiln-test-query-once"
    _create_indexed_table(dynamodb, table)
    for i in range(12):
        dynamodb.put_item(TableName=table, Item={
            "p": {"S": "all"}, "r": {"S": f"r{i:02d}"}, "g": {"S": "g"}, "v": {"N": str(i)}, "a": {"S": f"a{i}"},
            "big": {"M": {"text": {"S": "x" * 500}, "list": {"L": [{"N": str(i)}, {"SS": ["s", "t"]}]}}}})
    index = {"IndexName": "ByV", "KeyConditionExpression": "g = :g", "ExpressionAttributeValues": {":g": {"S": "g"}}}
    queries = [
        {**index, "ProjectionExpression": "r, a, v", "ScanIndexForward": False, "Limit": 5},
        {**index, "ProjectionExpression": "r, a, v", "Limit": 5,
         "ExclusiveStartKey": {"p": {"S": "all"}, "r": {"S": "r04"}, "g": {"S": "g"}, "v": {"N": "4"}}},
        {**index, "Limit": 3},  # no projection: whole items
        {**index, "ProjectionExpression": "a, #b.#l", "ExpressionAttributeNames": {"#b": "big", "#l": "list"}},
        {**index, "ProjectionExpression": "a", "FilterExpression": "size(big.#l) = :two",
         "ExpressionAttributeNames": {"#l": "list"},
         "ExpressionAttributeValues": {":g": {"S": "g"}, ":two": {"N": "2"}}},
        {"KeyConditionExpression": "p = :p AND r > :r", "ProjectionExpression": "big, r",
         "ExpressionAttributeValues": {":p": {"S": "all"}, ":r": {"S": "r08"}}},
    ]
    counted = {"sizes": 0, "copies": 0}
    size, deepcopy = DynamoType.size, DynamoType.__deepcopy__

    def counted_size(self):
        counted["sizes"] += 1
        return size(self)

    def counted_copy(self, memo):
        counted["copies"] += 1
        return deepcopy(self, memo)

    monkeypatch.setattr(DynamoType, "size", counted_size)
    monkeypatch.setattr(DynamoType, "__deepcopy__", counted_copy)

    def answers():
        found = []
        for query in queries:
            counted.update(sizes=0, copies=0)
            found.append((dynamodb.query(TableName=table, **query), dict(counted)))
        return found

    # WHEN each query is answered by the patched moto, then by moto's own code
    patched = answers()
    with monkeypatch.context() as unpatched:
        unpatched.setattr(Table, "query", moto_patches._originals["dynamodb_query"])
        unpatched.setattr(Item, "size", moto_patches._originals["dynamodb_item_size"])
        unpatched.setattr(table_module, "copy", copy)
        original = answers()
    dynamodb.delete_table(TableName=table)
    # THEN every answer is moto's own: items, counts, next keys
    for (mine, _), (theirs, _) in zip(patched, original, strict=True):
        for response in (mine, theirs):
            response.pop("ResponseMetadata")
        assert mine == theirs
    assert [len(r["Items"]) for r, _ in patched] == [5, 5, 3, 12, 12, 3]
    # AND the patched query sized each item once (moto: once per item it looks at, again per item it returns)
    assert all(mine["sizes"] < theirs["sizes"] for (_, mine), (_, theirs) in zip(patched, original, strict=True))
    # AND with top-level names and no filter it copied only those names (moto: every value of every item)
    assert [mine["copies"] < theirs["copies"] for (_, mine), (_, theirs) in zip(patched, original, strict=True)] == [
        True, True, False, False, False, True]


def test_json_paths_are_parsed_once_and_read_each_document(local_stack):
    # GIVEN moto's Step Functions JSONPath helpers (patched: each path parsed once)
    from moto.stepfunctions.parser.asl.component.common.path import result_path
    from moto.stepfunctions.parser.asl.utils import json_path

    # WHEN one path reads two documents, and a missing member
    first = json_path.extract_json("$.Job.Name", {"Job": {"Name": "a"}})
    second = json_path.extract_json("$.Job.Name", {"Job": {"Name": "b", "Other": 1}})
    # THEN each answer is its own document's, and a missing member is refused as by moto
    assert (first, second) == ("a", "b")
    try:
        json_path.extract_json("$.Job.Missing", {"Job": {}})
    except json_path.NoSuchJsonPathError:
        pass
    else:
        raise AssertionError("a missing member was found")
    # AND both modules parse a path once, into the expression jsonpath_ng builds for it
    for module in (json_path, result_path):
        assert module.parse("$.Mark") is module.parse("$.Mark")
        assert str(module.parse("$.Mark")) == str(moto_patches._originals[f"jsonpath_parse_{module.__name__}"]("$.Mark"))
