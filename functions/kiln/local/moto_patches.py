"""Every workaround Kiln applies to moto 5.2.5, in one place.

1. moto's Step Functions ECS and Batch integrations never normalise parameters or responses
   (``_normalise_parameters`` is a no-op), so ``"Cluster"`` reaches botocore as is and the state
   fails with ``States.Runtime``. :func:`patch_service_normalisation` rebuilds both from
   botocore's operation shapes, as AWS does.
2. moto runs Lambda functions in Docker (none here). :func:`patch_lambda_in_process` runs the
   function's real Python handler in this process instead.
3. moto's SendTaskFailure response handler drops ``cause`` (only ``error`` reaches the
   execution), so a failure reason sent by the compiler is lost.
   :func:`patch_send_task_failure_cause` passes it on.
4. moto reports a heartbeat timeout as ``States.Timeout``; AWS reports
   ``States.HeartbeatTimeout``, which Kiln reads as "the container never started"
   (MaxPendingTimeInSeconds). :func:`patch_heartbeat_timeout_name` restores AWS's name.
5. moto's UpdateModelPackage clears the approval status when a request omits it:
   :func:`patch_update_model_package_keeps_fields` keeps omitted fields, as AWS does.
6. moto lets a second SendTaskSuccess/Failure overwrite the first answer to a task token before
   the state consumes it (AWS accepts one answer): :func:`patch_first_token_answer_wins`.
7. moto's DynamoDB checks a write's condition and then applies it without a lock, so concurrent
   conditional writes from the server's threads can all pass (seen: 4 of 50 concurrent creates of
   one name succeeded). DynamoDB evaluates and applies atomically:
   :func:`patch_dynamodb_atomic_writes` serialises moto's write operations.
8. moto's ECS/Batch never run containers. :func:`patch_container_runner` hands each RunTask /
   SubmitJob to a callback (the local runner starts the real compiler entrypoint as a process),
   and StopTask / TerminateJob to another. moto's Batch job would try Docker and fail at once
   (FAILED, so StopCompilationJob could not find it): the patched job stays RUNNING until its local
   process ends (:func:`batch_container_exited`) or it is terminated, as a Batch job does.
9. moto's Step Functions interpreter calls the server back at ``MOTO_PORT`` read from the
   process environment (default 5000). :func:`patch_server_port` tells it the embedded server's
   port instead, so local mode never sets environment variables.
10. Speed, measured under ``make load`` (bench/results/2026-12-01-load-latency.md): moto's server
   lists and ``stat``s its ~150 package folders on every request, under its dispatch lock
   (:func:`patch_server_module_list` lists them once), and serialises every DynamoDB response by
   walking botocore's shapes item by item (a 40-item Query: ~25 ms of CPU).
   :func:`patch_dynamodb_fast_reads` writes the JSON of GetItem/Query/Scan/BatchGetItem results
   directly: they are already DynamoDB JSON, so the bytes are the same. moto's Step Functions
   builds a new boto3 client (the service model loaded again, ~50 ms) for every task it runs:
   :func:`patch_step_functions_clients_reused` keeps one per service. moto's TransactWriteItems
   deep-copies every table it names to be able to roll back (O(rows) per write):
   :func:`patch_dynamodb_transaction_snapshots` backs up only the items it names. moto projects an
   item by converting all of it once per projected name: :func:`patch_dynamodb_projection` picks
   top-level names. moto lists a response class's methods (``inspect.getmembers``) on every
   request: :func:`patch_response_method_names` lists them once per class.
11. moto keeps every model instance it builds in a list per class (for its dashboard), among them
   the DynamoDB items it builds for every read: a leak whose size every full garbage collection
   walks (ADR 0043). :func:`patch_dynamodb_items_untracked` stops that for items; the fast reads
   also write a read's JSON from moto's items without first copying them into plain values.
12. moto's Step Functions parses the state machine's definition with its ANTLR grammar again for
   every execution it starts (~75 ms of CPU for Kiln's), so 20 jobs accepted at once spent ~1.5 s
   of the stack's interpreter lock parsing the same text while the API waited (ADR 0050).
   :func:`patch_step_functions_parse_once` keeps the parse tree per definition; every execution
   still builds its own states from it, as moto does, reading each node's text stored on it once
   (ANTLR's ``getText`` re-joins a node's whole subtree on every call: ADR 0058).

13. moto's DynamoDB Query sizes every result item twice (``Item.size`` walks every value, for the
   1 MB page limit) and deep-copies every result item whole before projecting it: under the issue's
   load (20 jobs listed 20 at a time) ~25 % of the stack's interpreter-lock time (ADR 0058).
   :func:`patch_dynamodb_query_copies` sizes each item once per query and, for a projection of
   top-level names without a filter, copies only the projected attributes.

   moto's Step Functions also parses every JSONPath it evaluates with a new jsonpath_ng parser:
   :func:`patch_step_functions_json_paths_parsed_once` keeps each parsed path.

``tests/workflow/test_moto_patches.py`` notices when upstream fixes (1), (3) or (4).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import importlib
import inspect
import json
import logging
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import boto3

log = logging.getLogger(__name__)

_applied: set[str] = set()
_originals: dict[str, Any] = {}


_operation_models = threading.Lock()


def _operation_model(service: str, action: str) -> Any:
    """botocore's model of ``action`` (cached: building a client loads the service's JSON model,
    ~100 ms of CPU, and Step Functions asks twice per ECS/Batch task). One thread builds it: 20 jobs
    started at once otherwise built 20 clients each (seen in a profile of `kiln serve`)."""
    with _operation_models:
        return _build_operation_model(service, action)


@functools.cache
def _build_operation_model(service: str, action: str) -> Any:
    client = boto3.session.Session(region_name="us-east-1").client(
        service, aws_access_key_id="x", aws_secret_access_key="x")
    api_name = {v: k for k, v in client.meta.method_to_api_mapping.items()}.get(action, action)
    operation = client.meta.method_to_api_mapping.get(action, api_name)
    return client.meta.service_model.operation_model(operation)


def patch_server_port(port: int) -> None:
    """Point moto's own callbacks (Step Functions -> Lambda/ECS/Batch) at the server on ``port``."""
    import moto.settings
    from moto.stepfunctions.parser.asl.utils import boto_client

    def moto_server_port() -> str:
        return str(port)

    _originals.setdefault("moto_server_port", moto.settings.moto_server_port)
    moto.settings.moto_server_port = moto_server_port
    boto_client.moto_server_port = moto_server_port  # imported by name there
    _applied.add("server_port")


def patch_service_normalisation() -> None:
    """Make moto's ECS and Batch task states speak the Pascal-cased Step Functions dialect."""
    if "normalisation" in _applied:
        return
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_batch import (
        StateTaskServiceBatch,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
        StateTaskServiceEcs,
    )

    def _normalise_parameters(self: Any, parameters: dict[str, Any], boto_service_name: str | None = None,
                              service_action_name: str | None = None) -> None:
        service = boto_service_name or self._get_boto_service_name()
        action = service_action_name or self._get_boto_service_action()
        shape = _operation_model(service, action).input_shape
        if shape is not None:
            self._to_boto_request(parameters, shape)

    def _normalise_response(self: Any, response: Any, boto_service_name: str | None = None,
                            service_action_name: str | None = None) -> None:
        service = boto_service_name or self._get_boto_service_name()
        action = service_action_name or self._get_boto_service_action()
        shape = _operation_model(service, action).output_shape
        if shape is not None:
            self._from_boto_response(response, shape)

    _originals["ecs_normalise"] = StateTaskServiceEcs._normalise_parameters
    for cls in (StateTaskServiceEcs, StateTaskServiceBatch):
        cls._normalise_parameters = _normalise_parameters  # type: ignore[method-assign]
        cls._normalise_response = _normalise_response  # type: ignore[method-assign]
    _applied.add("normalisation")


def patch_send_task_failure_cause() -> None:
    """Pass SendTaskFailure's ``cause`` through to the waiting state (moto drops it)."""
    if "cause" in _applied:
        return
    from moto.core.responses import ActionResult, EmptyResult
    from moto.stepfunctions.responses import StepFunctionResponse

    def send_task_failure(self: Any) -> ActionResult:
        self.stepfunction_backend.send_task_failure(self._get_param("taskToken"), error=self._get_param("error"),
                                                    cause=self._get_param("cause"))
        return EmptyResult()

    _originals["send_task_failure"] = StepFunctionResponse.send_task_failure
    StepFunctionResponse.send_task_failure = send_task_failure  # type: ignore[method-assign]
    _applied.add("cause")


def patch_heartbeat_timeout_name() -> None:
    """Report heartbeat timeouts as ``States.HeartbeatTimeout``, as AWS does."""
    if "heartbeat" in _applied:
        return
    from moto.stepfunctions.parser.api import HistoryEventType, TaskTimedOutEventDetails
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import FailureEvent
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
        StatesErrorNameType,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.state_task import StateTask
    from moto.stepfunctions.parser.asl.eval.callback.callback import HeartbeatTimeoutError
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

    original = StateTask._from_error
    _originals["task_from_error"] = original

    def _from_error(self: Any, env: Any, ex: Exception) -> Any:
        if isinstance(ex, HeartbeatTimeoutError):
            name = StatesErrorNameType.StatesHeartbeatTimeout
            return FailureEvent(env=env, error_name=StatesErrorName(typ=name),
                                event_type=HistoryEventType.TaskTimedOut,
                                event_details=EventDetails(  # type: ignore[typeddict-item]
                                    taskTimedOutEventDetails=TaskTimedOutEventDetails(error=name.to_name())))
        return original(self, env, ex)

    StateTask._from_error = _from_error  # type: ignore[method-assign]
    _applied.add("heartbeat")


def patch_first_token_answer_wins() -> None:
    """A task token takes one answer; later ones are refused (InvalidToken), as in AWS."""
    if "first_answer" in _applied:
        return
    from moto.stepfunctions.parser.asl.eval.callback.callback import CallbackPoolManager

    original = CallbackPoolManager.notify
    _originals["callback_notify"] = original

    def notify(self: Any, callback_id: Any, outcome: Any) -> bool:
        endpoint = self._pool.get(callback_id)
        if endpoint is not None and endpoint.get_outcome() is not None:
            return False
        return bool(original(self, callback_id, outcome))

    CallbackPoolManager.notify = notify  # type: ignore[method-assign]
    _applied.add("first_answer")


def patch_dynamodb_atomic_writes() -> None:
    """Make moto's conditional DynamoDB writes atomic (one writer at a time), as DynamoDB's are."""
    if "dynamodb_lock" in _applied:
        return
    import threading

    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)
        _originals[f"dynamodb_{name}"] = original

        def locked(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(self, *args, **kwargs)

        setattr(DynamoDBBackend, name, functools.wraps(original)(locked))
    _applied.add("dynamodb_lock")


def patch_server_module_list() -> None:
    """List moto's service modules once (moto's server re-lists its package folder per request)."""
    if "module_list" in _applied:
        return

    from moto import backends

    original = backends.list_of_moto_modules
    _originals["list_of_moto_modules"] = original
    modules = tuple(original())

    @functools.wraps(original)
    def list_of_moto_modules() -> Iterator[str]:
        return iter(modules)

    backends.list_of_moto_modules = list_of_moto_modules
    _applied.add("module_list")


def patch_response_method_names() -> None:
    """Look up a moto response class's action methods once per class (moto calls
    ``inspect.getmembers`` on the class for every request: ~7 % of a DynamoDB GetItem's CPU)."""
    if "method_names" in _applied:
        return
    from moto.core import responses

    original = responses.method_names_from_class
    _originals["method_names_from_class"] = original
    cached = functools.cache(lambda clazz: frozenset(original(clazz)))

    @functools.wraps(original)
    def method_names_from_class(clazz: object) -> Any:
        return cached(clazz)

    responses.method_names_from_class = method_names_from_class  # imported by name there
    _applied.add("method_names")


# Operations whose results hold only item attribute maps, keys, counts and consumed capacity:
# their moto result is DynamoDB JSON already (binary values as bytes).
FAST_DYNAMODB_READS = frozenset({"GetItem", "Query", "Scan", "BatchGetItem"})


def _dynamodb_json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not DynamoDB JSON")


def _drop_none(value: Any) -> Any:
    """The shape walker leaves members that are None out; so does this."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _dynamodb_item_json_default(value: Any) -> Any:
    """``json.dumps`` default for moto's own values: a DynamoType is its DynamoDB JSON already."""
    from moto.dynamodb.models.dynamo_type import DynamoType

    if isinstance(value, DynamoType):
        return value.to_json()  # {type: value}, binary base64-encoded; nested DynamoTypes come back here
    return _dynamodb_json_default(value)


def patch_dynamodb_fast_reads() -> None:
    """Serialise DynamoDB read results with ``json.dumps`` instead of moto's shape walker, from
    moto's items as they are (moto first copies every result into plain values, item by item)."""
    if "dynamodb_fast_reads" in _applied:
        return
    from moto.dynamodb.models.utilities import dynamo_to_dict
    from moto.dynamodb.responses import DynamoResult

    original = DynamoResult.execute_result
    original_init = DynamoResult.__init__
    _originals["dynamodb_execute_result"] = original
    _originals["dynamodb_result_init"] = original_init

    def __init__(self: Any, result: object) -> None:
        # the conversion waits for execute_result: a read's JSON is written from the items as they are
        self._result = result
        self._converted = False

    def execute_result(self: Any, context: Any) -> Any:
        operation = context.operation_model
        if operation.name not in FAST_DYNAMODB_READS or isinstance(self._result, Exception):
            if not getattr(self, "_converted", True):
                self._result, self._converted = dynamo_to_dict(self._result), True
            return original(self, context)
        body = json.dumps(_drop_none(self._result), default=_dynamodb_item_json_default, separators=(",", ":"))
        version = operation.service_model.metadata.get("jsonVersion", "1.0")
        return 200, {"Content-Type": f"application/x-amz-json-{version}"}, body

    DynamoResult.__init__ = __init__  # type: ignore[method-assign]
    DynamoResult.execute_result = execute_result  # type: ignore[method-assign]
    _applied.add("dynamodb_fast_reads")


def patch_dynamodb_items_untracked() -> None:
    """Stop moto keeping every DynamoDB item it ever built (ADR 0043).

    moto's ``BaseModel`` appends each instance to its class's ``instances_tracked`` list (for the
    ``/moto-api/data.json`` dashboard; cleared only on reset), and moto builds new items for every
    read (Query copies and projects each result item: 40 per 20-item page). In a long-running
    ``kiln serve`` that list only grows (64,598 items after 45 s of the issue's load, 20 jobs in
    the table), and every full garbage collection walks all of it while holding the interpreter
    lock: pauses grew to 0.8 s and beyond. Items are kept by their tables, as in DynamoDB."""
    if "dynamodb_items_untracked" in _applied:
        return
    from moto.dynamodb.models.dynamo_type import Item

    _originals["dynamodb_item_new"] = Item.__new__

    def __new__(cls: type[Any], *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    Item.__new__ = staticmethod(__new__)  # type: ignore[method-assign]
    Item.instances_tracked.clear()  # type: ignore[attr-defined]
    _applied.add("dynamodb_items_untracked")


def patch_step_functions_clients_reused() -> None:
    """One boto3 client per (region, service) for moto's Step Functions tasks: moto builds a fresh
    client (botocore's service model loaded again) for every Lambda/ECS/Batch call of every state."""
    if "sfn_clients" in _applied:
        return
    import sys

    # The task modules import ``boto_client_for`` by name: load them first, then rebind each.
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils  # noqa: F401
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (  # noqa: F401
        state_task_service_batch,
        state_task_service_callback,
        state_task_service_ecs,
    )
    from moto.stepfunctions.parser.asl.utils import boto_client

    original = boto_client.boto_client_for
    _originals["boto_client_for"] = original
    lock = threading.Lock()
    clients: dict[tuple[str, str, str], Any] = {}

    def boto_client_for(region: str, service: str, state_credentials: Any = None) -> Any:
        with lock:  # building a client is not thread-safe; using one is
            key = (region, service, boto_client.moto_server_port())  # a later stack has another port
            if key not in clients:
                clients[key] = original(region, service, state_credentials)
            return clients[key]

    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("moto.stepfunctions")
                and getattr(module, "boto_client_for", None) is original):
            module.boto_client_for = boto_client_for  # type: ignore[attr-defined]
    _applied.add("sfn_clients")


def patch_dynamodb_projection() -> None:
    """Project items on top-level attribute names by picking them (moto converts the whole item to
    Python values and back once per projected name: 12 names on a job record cost ~1 ms per item)."""
    if "dynamodb_projection" in _applied:
        return
    from moto.dynamodb.models.dynamo_type import Item, LimitedSizeDict

    original = Item.project
    _originals["dynamodb_project"] = original

    def project(self: Any, projection_expressions: list[list[str]]) -> Any:
        if not all(len(path) == 1 for path in projection_expressions):  # nested paths: moto's way
            return original(self, projection_expressions)
        # A subset of an item that passed moto's checks when written: built as moto's own
        # Item.__deepcopy__ builds one, without ``Item.__init__`` converting every value again and
        # its LimitedSizeDict re-summing the item's size at every attribute (O(n^2) per item; ~25 %
        # of the stack's CPU under the issue's load, the List calls' Query, ADR 0050). The values are
        # shared, not copied: a Query's are its own deep copies already, and a GetItem's are the
        # stored item's, which moto's unprojected GetItem returns as they are too.
        projected: Any = Item.__new__(Item)
        projected.hash_key, projected.range_key = self.hash_key, self.range_key
        attrs = LimitedSizeDict.__new__(LimitedSizeDict)
        dict.__init__(attrs, ((name, self.attrs[name]) for name in (path[0] for path in projection_expressions)
                              if name in self.attrs))
        projected.attrs = attrs
        return projected

    Item.project = project  # type: ignore[method-assign]
    _applied.add("dynamodb_projection")


def patch_dynamodb_transaction_snapshots() -> None:
    """Back a DynamoDB transaction up by the items it names, not by deep copies of whole tables.

    moto's TransactWriteItems deep-copies each table it names (once per item naming it) so that it
    can roll back: O(rows) per write (seen: 1,000 creates in 219 s, a refused create ~50 ms with 500
    jobs). The copy here is the table object with its item index copied by reference, and deep
    copies only of the items the transaction names (the only ones it can change). Writes are already
    one at a time (:func:`patch_dynamodb_atomic_writes`), so nothing changes the table meanwhile."""
    if "dynamodb_snapshots" in _applied:
        return
    import copy
    import types
    from collections import defaultdict

    from moto.dynamodb import models as dynamodb_models
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    named = threading.local()  # table name -> the keys the running transaction names

    def snapshot(table: Any) -> Any:
        keys = getattr(named, "keys", {}).get(table.name, [])
        backup = copy.copy(table)
        backup.items = defaultdict(dict, {hash_value: dict(by_range) if table.range_key_attr else by_range
                                          for hash_value, by_range in table.items.items()})
        for hash_value, range_value in keys:
            if range_value is None and hash_value in table.items:
                backup.items[hash_value] = copy.deepcopy(table.items[hash_value])
            elif range_value is not None and range_value in table.items.get(hash_value, {}):
                backup.items[hash_value][range_value] = copy.deepcopy(table.items[hash_value][range_value])
        return backup

    def deepcopy(value: Any, memo: Any = None) -> Any:
        if isinstance(value, Table) and hasattr(named, "keys"):
            return snapshot(value)
        return copy.deepcopy(value, memo)

    # moto.dynamodb.models calls copy.deepcopy through its module global ``copy``: only it sees this.
    dynamodb_models.copy = types.SimpleNamespace(**{**vars(copy), "deepcopy": deepcopy})  # type: ignore[assignment]
    original = DynamoDBBackend.transact_write_items
    _originals["dynamodb_transact_snapshots"] = original

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        keys: dict[str, list[tuple[Any, Any]]] = {}
        for entry in transact_items:
            for op_type, op in entry.items():
                table = self.tables.get(op.get("TableName")) if isinstance(op, dict) else None
                if table is None:
                    continue
                key = op.get("Item") if op_type == "Put" else op.get("Key")
                if not key or table.hash_key_attr not in key:
                    continue  # moto reports the malformed item itself
                range_raw = key.get(table.range_key_attr) if table.range_key_attr else None
                keys.setdefault(table.name, []).append(
                    (DynamoType(key[table.hash_key_attr]), DynamoType(range_raw) if range_raw else None))
        named.keys = keys
        try:
            original(self, transact_items)
        finally:
            del named.keys

    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    _applied.add("dynamodb_snapshots")


def upstream_still_needs_patches() -> dict[str, bool]:
    """For each moto workaround, whether moto's own (unpatched) code still has the defect.

    Reads the original methods, saved before patching, so it answers the same before and after."""
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service import (
        StateTaskService,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
        StateTaskServiceEcs,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.state_task import StateTask
    from moto.stepfunctions.responses import StepFunctionResponse

    normalise = _originals.get("ecs_normalise") or StateTaskServiceEcs.__dict__.get(
        "_normalise_parameters", StateTaskService.__dict__["_normalise_parameters"])
    failure = _originals.get("send_task_failure") or StepFunctionResponse.send_task_failure
    from_error = _originals.get("task_from_error") or StateTask._from_error
    from moto.stepfunctions.parser.asl.eval.callback.callback import CallbackPoolManager

    notify = _originals.get("callback_notify") or CallbackPoolManager.notify
    from moto.dynamodb.models import DynamoDBBackend

    transact = _originals.get("dynamodb_transact_write_items") or DynamoDBBackend.transact_write_items
    return {
        "dynamodb_atomic_writes": "Lock" not in inspect.getsource(inspect.getmodule(transact))  # type: ignore[arg-type]
                                  and "lock" not in inspect.getsource(transact),
        "first_answer_wins": "get_outcome" not in inspect.getsource(notify)
                             and "_outcome" not in inspect.getsource(notify),
        "normalisation": "_to_boto_request" not in inspect.getsource(normalise),
        "failure_cause": "cause" not in inspect.getsource(failure),
        "heartbeat_timeout_name": "Heartbeat" not in inspect.getsource(from_error),
    }


def patch_update_model_package_keeps_fields() -> None:
    """moto 5.2.5's UpdateModelPackage clears ModelApprovalStatus, ApprovalDescription and
    CustomerMetadataProperties when a request omits them (AWS leaves them unchanged), so the
    registry write-back would un-approve the package. Keep omitted fields as they are.
    ``tests/functional/test_registry.py`` notices when upstream fixes it."""
    from moto.sagemaker.models import SageMakerModelBackend

    original = SageMakerModelBackend.update_model_package
    if getattr(original, "_kiln_patched", False):
        return

    def update_model_package(self: Any, model_package_arn: str, model_approval_status: str | None,
                             approval_description: str | None, customer_metadata_properties: dict[str, str] | None,
                             customer_metadata_properties_to_remove: list[str],
                             additional_inference_specifications_to_add: list[Any] | None) -> str:
        package = self.model_packages.get(self.model_package_name_mapping.get(model_package_arn, model_package_arn))
        if package is not None:
            if model_approval_status is None:
                model_approval_status = package.model_approval_status
            if approval_description is None:
                approval_description = package.approval_description
            if package.customer_metadata_properties or customer_metadata_properties:
                customer_metadata_properties = {**(package.customer_metadata_properties or {}),
                                                **(customer_metadata_properties or {})}
        return original(self, model_package_arn, model_approval_status, approval_description,
                        customer_metadata_properties, customer_metadata_properties_to_remove,
                        additional_inference_specifications_to_add)

    update_model_package._kiln_patched = True  # type: ignore[attr-defined]
    update_model_package.__wrapped__ = original  # type: ignore[attr-defined]
    SageMakerModelBackend.update_model_package = update_model_package  # type: ignore[method-assign]


class _Context:
    """Enough of a Lambda context for Powertools."""

    function_name = "kiln-local"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:kiln-local"
    memory_limit_in_mb = 512
    aws_request_id = "local"
    log_group_name = "/aws/lambda/kiln-local"
    log_stream_name = "local"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 900_000


def _resolve_handler(path: str) -> Callable[[Any, Any], Any]:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def patch_lambda_in_process() -> None:
    """Invoke moto Lambda functions by calling their Python handler in this process."""
    if "lambda" in _applied:
        return
    from moto.awslambda.models import LambdaFunction

    def _invoke_lambda(self: Any, event: Any = None) -> tuple[str, bool, str]:
        payload = json.loads(event) if isinstance(event, str | bytes) else (event or {})
        try:
            result = _resolve_handler(self.handler)(payload, _Context())
            return json.dumps(result), False, ""
        except Exception as exc:
            log.info("in-process Lambda %s raised %s: %s", self.handler, type(exc).__name__, exc)
            body = {"errorType": type(exc).__name__, "errorMessage": str(exc),
                    "stackTrace": traceback.format_exception(exc)[-3:]}
            return json.dumps(body), True, ""

    LambdaFunction._invoke_lambda = _invoke_lambda  # type: ignore[method-assign]
    _applied.add("lambda")


ContainerStart = Callable[[str, dict[str, str]], None]
ContainerStop = Callable[[str], None]


_batch_done: dict[str, threading.Event] = {}


def batch_container_exited(job_arn: str) -> None:
    """The local process of the Batch job ``job_arn`` ended: its moto job ends too (see
    :func:`patch_container_runner`)."""
    _batch_done.setdefault(job_arn, threading.Event()).set()


def patch_container_runner(on_start: ContainerStart, on_stop: ContainerStop) -> None:
    """Call ``on_start(task_id, environment)`` for every ECS task / Batch job moto starts and
    ``on_stop(task_id)`` for every one it is asked to stop."""
    from moto.batch.models import BatchBackend, Job
    from moto.batch.utils import JobStatus
    from moto.ecs.models import EC2ContainerServiceBackend

    original_run_task = EC2ContainerServiceBackend.run_task
    original_stop_task = EC2ContainerServiceBackend.stop_task
    original_submit = BatchBackend.submit_job
    original_terminate = BatchBackend.terminate_job

    def run_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        tasks = original_run_task(self, *args, **kwargs)
        bound = inspect.signature(original_run_task).bind(self, *args, **kwargs)
        overrides = bound.arguments.get("overrides") or {}
        for task in tasks:
            env: dict[str, str] = {}
            for container in overrides.get("containerOverrides", []) or []:
                env.update({e["name"]: e.get("value", "") for e in container.get("environment", []) or []})
            on_start(task.task_arn, env)
        return tasks

    def stop_task(self: Any, cluster_str: str, task_str: str, reason: str) -> Any:
        on_stop(task_str)
        return original_stop_task(self, cluster_str, task_str, reason)

    def submit_job(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_submit(self, *args, **kwargs)
        job_id = result[2]
        bound = inspect.signature(original_submit).bind(self, *args, **kwargs)
        overrides = bound.arguments.get("container_overrides") or {}
        env = {e["name"]: e.get("value", "") for e in (overrides.get("environment") or [])}
        on_start(job_id, env)
        return result

    def terminate_job(self: Any, job_id: str, reason: str) -> Any:
        on_stop(job_id)
        result = original_terminate(self, job_id, reason)
        job = self.get_job_by_id(job_id)
        if job is not None:  # wake its thread (it waits for this or its process's exit)
            _batch_done.setdefault(job.arn, threading.Event()).set()
        return result

    original_job_init = Job.__init__

    def job_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_job_init(self, *args, **kwargs)
        self.daemon = True  # a job thread never keeps the process alive

    def job_run(self: Any) -> None:
        """The job is the local process: RUNNING until that process exits or the job is terminated."""
        self.job_started_at = datetime.datetime.now()
        self._start_attempt()
        self.status = JobStatus.RUNNING.value
        done = _batch_done.setdefault(self.arn, threading.Event())
        # Set when the process exits or the job is terminated; the timeout only bounds a missed wake-up.
        while not self.stop and not done.wait(30):
            pass
        _batch_done.pop(self.arn, None)
        self._mark_stopped(success=not self.stop)

    Job.__init__ = job_init  # type: ignore[method-assign]
    Job.run = job_run  # type: ignore[method-assign]
    EC2ContainerServiceBackend.run_task = run_task  # type: ignore[method-assign]
    EC2ContainerServiceBackend.stop_task = stop_task  # type: ignore[method-assign]
    BatchBackend.submit_job = submit_job  # type: ignore[method-assign]
    BatchBackend.terminate_job = terminate_job  # type: ignore[method-assign]
    _applied.add("containers")


def patch_step_functions_parse_once() -> None:
    """Parse each state machine definition once (moto parses it again for every execution).

    The ANTLR parse tree is kept per definition text (read-only once built); the evaluation
    components moto's preprocessor builds from it hold per-execution state, so each execution
    still gets its own (~15 ms). A definition that fails to parse raises as before, uncached."""
    if "sfn_parse_once" in _applied:
        return
    from antlr4.RuleContext import RuleContext
    from antlr4.tree.Tree import TerminalNode
    from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser
    from moto.stepfunctions.parser.asl.parse.preprocessor import Preprocessor

    original = AmazonStateLanguageParser.parse
    _originals["sfn_parse"] = original
    original_text = RuleContext.getText
    _originals["antlr_get_text"] = original_text
    lock = threading.Lock()
    trees: dict[str, Any] = {}

    def remember_texts(tree: Any) -> None:
        """Store every rule node's text on it, children first (O(n) once; moto's preprocessor calls
        ``getText`` ~3,800 times per execution, each re-joining its subtree: 40 ms -> 9 ms, ADR 0058)."""
        pending: list[tuple[Any, bool]] = [(tree, False)]
        while pending:
            node, children_done = pending.pop()
            if isinstance(node, TerminalNode):
                continue
            children = node.children or []
            if not children_done:
                pending.append((node, True))
                pending.extend((child, False) for child in children)
                continue
            with contextlib.suppress(AttributeError):  # a context class with slots only keeps ANTLR's way
                node._kiln_text = "".join(child.getText() for child in children)

    def get_text(self: Any) -> str:
        text = getattr(self, "_kiln_text", None)  # set only on the nodes of a kept (read-only) tree
        return text if text is not None else str(original_text(self))

    def parse(definition: str) -> tuple[Any, Any]:
        with lock:  # one thread parses; the others starting the same definition wait for its tree
            tree = trees.get(definition)
            if tree is None:
                program, tree = original(definition)
                remember_texts(tree)
                if len(trees) >= 32:  # bounded: tests create many state machines
                    trees.clear()
                trees[definition] = tree
                return program, tree
        return Preprocessor().visit(tree), tree

    RuleContext.getText = get_text
    AmazonStateLanguageParser.parse = staticmethod(parse)  # type: ignore[method-assign]
    _applied.add("sfn_parse_once")


def patch_step_functions_json_paths_parsed_once() -> None:
    """Parse each JSONPath of a state machine once (moto builds a new jsonpath_ng parser, a PLY
    grammar, for every path it evaluates: ~0.45 ms each, dozens per execution; ADR 0058). Parsed
    paths are immutable expression trees that ``find``/``update`` only read, so one serves every
    execution and thread."""
    if "sfn_json_paths" in _applied:
        return
    from moto.stepfunctions.parser.asl.component.common.path import result_path
    from moto.stepfunctions.parser.asl.utils import json_path

    for module in (json_path, result_path):  # each imported jsonpath_ng's ``parse`` by name
        _originals[f"jsonpath_parse_{module.__name__}"] = module.parse
        module.parse = functools.lru_cache(maxsize=1024)(module.parse)  # type: ignore[attr-defined]
    _applied.add("sfn_json_paths")


def warm_step_functions(region: str) -> None:
    """Build now what the Step Functions tasks of the first executions would otherwise build while
    the API waits: the boto3 clients moto's tasks call through (with
    :func:`patch_step_functions_clients_reused`) and the operation models of the ECS/Batch
    normalisation (:func:`patch_service_normalisation`)."""
    from moto.stepfunctions.parser.asl.utils import boto_client

    for service in ("lambda", "ecs", "batch"):
        boto_client.boto_client_for(region=region, service=service, state_credentials=None)
    for service, action in (("ecs", "run_task"), ("batch", "submit_job")):
        _operation_model(service, action)


def patch_dynamodb_query_copies() -> None:
    """DynamoDB Query: each candidate item sized once, and only the projected attributes copied.

    moto's ``Table.query`` calls ``Item.size()`` (a walk of every value) twice per item it returns,
    then deep-copies each whole item and projects the copy. Inside a query (and only there) this
    memoises ``Item.size`` per item and, when the projection is top-level names and no filter reads
    the items, copies just those names: the same result (an index's projection and the query's own
    both only drop top-level names, so picking the query's names first gives the same item) without
    copying what is thrown away. Any other query copies as moto does."""
    if "dynamodb_query_copies" in _applied:
        return
    import copy
    import types

    from moto.dynamodb.comparisons import OpDefault
    from moto.dynamodb.models import table as table_module
    from moto.dynamodb.models.dynamo_type import Item, LimitedSizeDict
    from moto.dynamodb.models.table import Table

    original_query, original_size = Table.query, Item.size
    _originals["dynamodb_query"], _originals["dynamodb_item_size"] = original_query, original_size
    signature = inspect.signature(original_query)
    running = threading.local()  # per thread: this query's item sizes and the names it keeps

    def size(self: Any) -> int:
        sizes = getattr(running, "sizes", None)
        if sizes is None:
            return int(original_size(self))
        known = sizes.get(id(self))
        if known is None:
            known = sizes[id(self)] = (self, original_size(self))  # the item held: its id stays its own
        return int(known[1])

    def copied(item: Any, names: frozenset[str]) -> Any:
        result: Any = Item.__new__(Item)  # as moto's Item.__deepcopy__ builds one, with fewer attributes
        result.hash_key, result.range_key = copy.deepcopy(item.hash_key), copy.deepcopy(item.range_key)
        attrs = LimitedSizeDict.__new__(LimitedSizeDict)
        dict.__init__(attrs, ((name, copy.deepcopy(value)) for name, value in item.attrs.items() if name in names))
        result.attrs = attrs
        return result

    def deepcopy(value: Any, memo: Any = None) -> Any:
        names = getattr(running, "names", None)
        if names is not None and isinstance(value, list) and all(type(v) is Item for v in value):
            return [copied(item, names) for item in value]
        return copy.deepcopy(value, memo)

    def query(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, *args, **kwargs).arguments
        projection = arguments.get("projection_expressions")
        unfiltered = isinstance(arguments.get("filter_expression"), OpDefault | None)  # moto's "no filter"
        plain = (projection and all(len(path) == 1 for path in projection) and unfiltered
                 and not arguments.get("filter_kwargs"))
        running.sizes = {}
        running.names = frozenset(path[0] for path in projection or []) if plain else None
        try:
            return original_query(self, *args, **kwargs)
        finally:
            running.sizes = running.names = None

    # moto's table module calls copy.deepcopy through its module global ``copy``: only it sees this.
    table_module.copy = types.SimpleNamespace(**{**vars(copy), "deepcopy": deepcopy})  # type: ignore[assignment]
    Item.size = size  # type: ignore[method-assign]
    Table.query = query  # type: ignore[method-assign]
    _applied.add("dynamodb_query_copies")


def warm_service_models(services: Iterable[str]) -> None:
    """Load now the botocore models moto's server reads per request (``get_service_model``, a cache
    without a lock, each miss listing botocore's ~400 service folders): a first call during the burst
    otherwise loads it in every thread that misses at once. Cheap when a model is loaded already."""
    from moto.core.utils import get_service_model

    for service in services:
        get_service_model(service)
