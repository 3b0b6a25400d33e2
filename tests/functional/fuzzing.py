"""Hypothesis strategies for fuzzing Kiln's API, generated from botocore's SageMaker input shapes,
and the one check every response must pass.

A generated request is either built from an operation's whole input shape (boundary lengths and
values, enums, patterns, wrong types, unknown members, unicode), or a valid request with one member
replaced by such a value (so that many reach the service and some are accepted), optionally with a
JSON value nested far deeper than any request (spliced into the body text: ``json.dumps`` itself
cannot write it). Malformed HTTP (bad JSON, non-object bodies, missing or unknown targets, wrong
content types, oversized bodies) is generated separately.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import botocore.session
from botocore.model import Shape
from hypothesis import strategies as st
from kiln.api import MAX_BODY_BYTES
from kiln.contract import OPERATIONS

MODEL = botocore.session.get_session().get_service_model("sagemaker")
DEEP = "__kiln_fuzz_deep__"
DEPTHS = (20, 64, 65, 1_000, 5_000, 50_000)
# Words that, in a message, would mean an internal detail leaked to the caller.
LEAKS = ("Traceback", 'File "', "/tmp/", "site-packages", "kiln-local-")

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24))
ANY_JSON = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=3)
                        | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=6)
UNICODE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
# A header value that can go on the wire (HTTP forbids CR/LF in it; clients refuse to send them).
HEADER_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40)


def _boundary_strings(shape: Shape) -> st.SearchStrategy[str]:
    low, high = shape.metadata.get("min", 0), shape.metadata.get("max")
    choices = ["", "a" * max(low, 1), "a" * max(low - 1, 0), " ", "\u0000", "é", "日本語", "😀" * 3, "../../etc/passwd"]
    if high is not None and high <= 70_000:
        choices += ["a" * high, "a" * (high + 1), "é" * high]
    return st.sampled_from(choices)


def _strings(shape: Shape) -> st.SearchStrategy[Any]:
    if shape.enum:
        return st.sampled_from(list(shape.enum)) | st.sampled_from([e.lower() for e in shape.enum]) | UNICODE
    pattern = shape.metadata.get("pattern")
    options: list[st.SearchStrategy[Any]] = [_boundary_strings(shape), UNICODE]
    if pattern:
        try:
            re.compile(pattern)
        except re.error:  # a Java-only construct; boundary and random text still apply
            pass
        else:
            high = shape.metadata.get("max", 2_048)
            options.append(st.from_regex(pattern, fullmatch=True).filter(lambda s, high=high: len(s) <= high + 1))
    return st.one_of(options)


def _numbers(shape: Shape) -> st.SearchStrategy[Any]:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    edges = [0, -1, 1, 2**31, 2**63, -(2**63)]
    edges += [v for v in (low, high) if v is not None]
    edges += [low - 1] if low is not None else []
    edges += [high + 1] if high is not None else []
    if shape.type_name in ("float", "double"):
        return st.sampled_from(edges) | st.floats(allow_nan=False, allow_infinity=False)
    return st.sampled_from(edges) | st.integers(min_value=low if low is not None else -(2**40),
                                                max_value=high if high is not None else 2**40)


def for_shape(shape: Shape, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for one botocore shape: mostly of its type (edges included), sometimes any JSON."""
    kind = shape.type_name
    strategy: st.SearchStrategy[Any]
    if kind == "structure":
        members = shape.members
        required = {m: for_shape(members[m], depth + 1) for m in shape.required_members}
        optional = {m: for_shape(s, depth + 1) for m, s in members.items() if m not in shape.required_members}
        known = st.fixed_dictionaries(required, optional=optional if depth < 4 else {})
        unknown = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in members), ANY_JSON,
                                  max_size=1)
        strategy = st.tuples(known, unknown | st.just({})).map(lambda pair: {**pair[0], **pair[1]})
    elif kind == "list":
        high = shape.metadata.get("max", 8)
        item = for_shape(shape.member, depth + 1)
        strategy = st.lists(item, max_size=min(high, 4))
        if high <= 64:
            strategy |= st.lists(item, min_size=high + 1, max_size=high + 1)
    elif kind == "map":
        strategy = st.dictionaries(for_shape(shape.key, depth + 1), for_shape(shape.value, depth + 1), max_size=3)
    elif kind == "string":
        strategy = _strings(shape)
    elif kind in ("integer", "long", "float", "double"):
        strategy = _numbers(shape)
    elif kind == "boolean":
        strategy = st.booleans()
    elif kind == "timestamp":
        strategy = (st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
                    | st.sampled_from(["2026-12-01T00:00:00Z", "2026-13-45", "yesterday", ""]))
    else:
        strategy = ANY_JSON
    return st.sampled_from([strategy] * 9 + [ANY_JSON]).flatmap(lambda chosen: chosen)


def input_shape(operation: str) -> Shape:
    shape = MODEL.operation_model(operation).input_shape
    assert shape is not None
    return shape


def member_names(operation: str) -> set[str]:
    """Every member name reachable from an operation's input shape, lower-cased."""
    names: set[str] = set()
    pending, seen = [input_shape(operation)], set()
    while pending:
        shape = pending.pop()
        if shape.name in seen:
            continue
        seen.add(shape.name)
        if shape.type_name == "structure":
            names.update(m.lower() for m in shape.members)
            pending.extend(shape.members.values())
        elif shape.type_name == "list":
            pending.append(shape.member)
        elif shape.type_name == "map":
            pending.extend((shape.key, shape.value))
    return names


@dataclass(frozen=True)
class Call:
    """One HTTP request to the API."""

    operation: str | None  # the X-Amz-Target operation (None: no target header)
    body: str
    content_type: str = "application/x-amz-json-1.1"
    target: str | None = None  # the raw X-Amz-Target when it is not SageMaker.<operation>

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        target = self.target if self.target is not None else (f"SageMaker.{self.operation}" if self.operation else None)
        if target is not None:
            headers["X-Amz-Target"] = target
        return headers


def _body(document: Any, deep: int | None) -> str:
    text = json.dumps(document, ensure_ascii=False)
    if deep is not None and f'"{DEEP}"' in text:
        text = text.replace(f'"{DEEP}"', "[" * deep + "]" * deep, 1)
    return text


def _with_member_replaced(request: dict[str, Any], shape: Shape, data: st.DataObject) -> dict[str, Any]:
    """``request`` with one member somewhere along its structure replaced by a generated value."""
    request = json.loads(json.dumps(request))
    if data.draw(st.integers(0, 4), label="unchanged") == 0:
        return request  # the valid request itself: accepted, or refused for its state (name in use...)
    node, node_shape = request, shape
    while True:
        name = data.draw(st.sampled_from(sorted(node_shape.members)), label="member")
        member = node_shape.members[name]
        if member.type_name == "structure" and isinstance(node.get(name), dict) and data.draw(st.booleans()):
            node, node_shape = node[name], member
            continue
        node[name] = DEEP if data.draw(st.integers(0, 9)) == 0 else data.draw(for_shape(member), label=name)
        return request


def calls(valid: dict[str, dict[str, Any]]) -> st.SearchStrategy[Call]:
    """API calls for all eight operations; ``valid`` holds one valid request per operation."""

    @st.composite
    def build(draw: st.DrawFn) -> Call:
        operation = draw(st.sampled_from(OPERATIONS), label="operation")
        shape = input_shape(operation)
        deep = draw(st.sampled_from(DEPTHS), label="depth")
        if draw(st.booleans(), label="from a valid request"):
            document = _with_member_replaced(valid[operation], shape, draw(st.data()))
        else:
            document = draw(for_shape(shape), label="request")
        return Call(operation, _body(document, deep))

    return build()


def malformed_calls() -> st.SearchStrategy[Call]:
    """HTTP that is not a well-formed JSON 1.1 request."""
    operation = st.sampled_from(OPERATIONS)
    bad_json = st.sampled_from(['{', '{"a":}', "nul", "{'a': 1}", '{"a": 1,}', "\ufeff{}", '{"a": NaN}',
                                '{"a": "\\ud800"}', "[" * 100_000, '{"a":' * 20_000, "\x00\x01"])
    non_object = st.sampled_from(["[]", "1", '"text"', "null", "true", "[{}]", "-0", "1e999"])
    return st.one_of(
        st.builds(Call, operation, bad_json | non_object),
        st.builds(Call, operation, st.just("{}"), st.sampled_from(
            ["text/plain", "application/json", "application/xml", "", "multipart/form-data; boundary=x"])),
        st.builds(Call, st.none(), st.just("{}")),
        st.builds(Call, operation, st.just("{}"), st.just("application/x-amz-json-1.1"), st.one_of(
            st.sampled_from(["SageMaker.", "SageMaker.NoSuchOperation", "sagemaker.ListCompilationJobs",
                             "AmazonSageMaker.ListCompilationJobs", "SageMaker.ListCompilationJobs ", "SageMaker"]),
            HEADER_TEXT)),
        st.builds(Call, operation, st.sampled_from([" " * (MAX_BODY_BYTES + 1),
                                                    json.dumps({"CompilationJobName": "a" * (MAX_BODY_BYTES + 1)})])),
    )


@dataclass
class Figures:
    """What a fuzz run saw: requests, server errors, responses breaking the contract, status codes."""

    requests: int = 0
    server_errors: int = 0
    bad_responses: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    types: Counter[str] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "5xx": self.server_errors, "bad_responses": self.bad_responses,
                "accepted_jobs": len(self.accepted), "statuses": dict(sorted(self.statuses.items())),
                "error_types": dict(self.types.most_common())}


def problems(call: Call, status: int, text: str) -> list[str]:
    """What is wrong with a response (empty: nothing). Never a 5xx; every 4xx is a JSON object
    ``{"__type", "message"}``; a validation error names a member; no internal detail leaks."""
    found = []
    if status >= 500:
        found.append(f"HTTP {status}")
    try:
        body = json.loads(text) if text else None
    except ValueError:
        return [*found, f"HTTP {status} with a body that is not JSON: {text[:200]!r}"]
    if not isinstance(body, dict):
        return [*found, f"HTTP {status} with a body that is not a JSON object: {text[:200]!r}"]
    if status >= 400:
        kind, message = body.get("__type"), body.get("message")
        if not isinstance(kind, str) or not isinstance(message, str) or not message:
            found.append(f"HTTP {status} without __type and message: {text[:200]!r}")
        elif kind == "ValidationException" and call.operation and not _names_what_is_wrong(call, message):
            found.append(f"ValidationException naming no member of {call.operation}: {message[:300]!r}")
        if isinstance(message, str) and any(leak in message for leak in LEAKS):
            found.append(f"internal detail in the message: {message[:300]!r}")
    return found


def _names_what_is_wrong(call: Call, message: str) -> bool:
    """A validation message names a member of the operation, or the resource the request names
    (e.g. "Compilation job X is FAILED and cannot be stopped"), or says the body is not an object."""
    lowered = message.lower()
    if "request body" in lowered or any(name in lowered for name in member_names(call.operation or "")):
        return True
    try:
        document = json.loads(call.body)
    except (ValueError, RecursionError):
        return False
    values = document.values() if isinstance(document, dict) else []
    return any(isinstance(v, str) and v and v in message for v in values)


def record(figures: Figures, call: Call, status: int, text: str) -> list[str]:
    """Count one response; its problems."""
    figures.requests += 1
    figures.statuses[status] += 1
    found = problems(call, status, text)
    if status >= 500:
        figures.server_errors += 1
    if found:
        figures.bad_responses += 1
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {}
    if isinstance(body, dict) and status >= 400 and isinstance(body.get("__type"), str):
        figures.types[body["__type"]] += 1
    if call.operation == "CreateCompilationJob" and status == 200:
        figures.accepted.append(json.loads(call.body)["CompilationJobName"])
    return found
