"""The wire contract: request validation and response shaping from botocore's SageMaker model.

Every structural rule (required and unknown members, types, lengths, ranges, patterns, enums,
list sizes) is read from botocore's service model, so Kiln accepts exactly what SageMaker
accepts. Messages follow SageMaker's style::

    1 validation error detected: Value 'a_b' at 'compilationJobName' failed to satisfy
    constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from typing import Any

import botocore.session
import regex
from botocore.model import ListShape, MapShape, OperationModel, ServiceModel, Shape, StructureShape

from kiln.errors import ValidationError

# The operations Kiln serves, by their wire names.
OPERATIONS = (
    "CreateCompilationJob",
    "DescribeCompilationJob",
    "ListCompilationJobs",
    "StopCompilationJob",
    "DeleteCompilationJob",
    "AddTags",
    "ListTags",
    "DeleteTags",
)


_service_model_lock = threading.Lock()


def service_model() -> ServiceModel:
    """botocore's SageMaker service model (loaded once per process, by one thread: ~80 ms of CPU
    each, and 20 workflow steps started at once otherwise each loaded it, seen in local mode)."""
    with _service_model_lock:
        return _load_service_model()


@functools.cache
def _load_service_model() -> ServiceModel:
    return botocore.session.get_session().get_service_model("sagemaker")


def operation_model(operation: str) -> OperationModel:
    return service_model().operation_model(operation)


@functools.cache
def _compiled(pattern: str) -> regex.Pattern[str]:
    # botocore patterns are Java regexes (\p{L} classes included), matched against the whole value.
    return regex.compile(pattern)


def _path_name(member: str) -> str:
    """SageMaker reports member paths in lowerCamelCase ('inputConfig.s3Uri')."""
    return member[:1].lower() + member[1:]


_SHOWN_CHARS = 256  # a value quoted in a message is clipped (a 1 MB string is not echoed back)
_LISTED_ERRORS = 10


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = f"'{value}'" if isinstance(value, str) else str(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


class _Validator:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, value: Any, path: str, constraint: str) -> None:
        self.errors.append(f"Value {_show(value)} at '{path}' failed to satisfy constraint: {constraint}")

    def check(self, shape: Shape, value: Any, path: str) -> None:
        if value is None:
            return
        kind = shape.type_name
        checker = getattr(self, f"_check_{kind}", None)
        if checker is not None:
            checker(shape, value, path)

    def _check_structure(self, shape: StructureShape, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self.fail(value if not isinstance(value, list | dict) else type(value).__name__, path,
                      "Member must be an object")
            return
        for name in shape.required_members:
            if value.get(name) is None:
                self.fail(None, self._join(path, name), "Member must not be null")
        for name, member_value in value.items():
            if name not in shape.members:
                where = f" at '{path}'" if path else ""
                self.errors.append(f"Unknown member '{name}'{where}: valid members are "
                                   f"{', '.join(shape.members)}")
                continue
            self.check(shape.members[name], member_value, self._join(path, name))

    def _check_list(self, shape: ListShape, value: Any, path: str) -> None:
        if not isinstance(value, list):
            self.fail(value, path, "Member must be a list")
            return
        self._length(shape, value, len(value), path)
        for index, item in enumerate(value, start=1):
            self.check(shape.member, item, f"{path}.{index}.member")

    def _check_map(self, shape: MapShape, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, path, "Member must be a map")
            return
        self._length(shape, value, len(value), path)
        for key, item in value.items():
            self.check(shape.key, key, f"{path}.key")
            self.check(shape.value, item, f"{path}.{key}")

    def _check_string(self, shape: Shape, value: Any, path: str) -> None:
        if not isinstance(value, str):
            self.fail(value, path, "Member must be a string")
            return
        enum = shape.enum
        if enum and value not in enum:
            self.fail(value, path, f"Member must satisfy enum value set: [{', '.join(enum)}]")
            return
        self._length(shape, value, len(value), path)
        pattern = shape.metadata.get("pattern")
        if pattern and not _compiled(pattern).fullmatch(value):
            self.fail(value, path, f"Member must satisfy regular expression pattern: {pattern}")

    def _check_integer(self, shape: Shape, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(value, path, "Member must be an integer")
            return
        self._range(shape, value, path)

    _check_long = _check_integer

    def _check_float(self, shape: Shape, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(value, path, "Member must be a number")
            return
        self._range(shape, value, path)

    _check_double = _check_float

    def _check_boolean(self, shape: Shape, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            self.fail(value, path, "Member must be a boolean")

    def _check_timestamp(self, shape: Shape, value: Any, path: str) -> None:
        if parse_timestamp(value) is None:
            self.fail(value, path, "Member must be a timestamp (epoch seconds or ISO 8601)")

    def _length(self, shape: Shape, value: Any, length: int, path: str) -> None:
        shown = value if isinstance(value, str) else f"[{length} items]" if isinstance(value, list) else value
        if "min" in shape.metadata and length < shape.metadata["min"]:
            self.fail(shown, path, f"Member must have length greater than or equal to {shape.metadata['min']}")
        if "max" in shape.metadata and length > shape.metadata["max"]:
            self.fail(shown, path, f"Member must have length less than or equal to {shape.metadata['max']}")

    def _range(self, shape: Shape, value: float, path: str) -> None:
        if "min" in shape.metadata and value < shape.metadata["min"]:
            self.fail(value, path, f"Member must have value greater than or equal to {shape.metadata['min']}")
        if "max" in shape.metadata and value > shape.metadata["max"]:
            self.fail(value, path, f"Member must have value less than or equal to {shape.metadata['max']}")

    @staticmethod
    def _join(path: str, member: str) -> str:
        return f"{path}.{_path_name(member)}" if path else _path_name(member)


def raise_validation(errors: list[str]) -> None:
    """Raise one ``ValidationError`` listing every error, as SageMaker does."""
    if not errors:
        return
    noun = "error" if len(errors) == 1 else "errors"
    more = f"; and {len(errors) - _LISTED_ERRORS} more" if len(errors) > _LISTED_ERRORS else ""
    raise ValidationError(f"{len(errors)} validation {noun} detected: " + "; ".join(errors[:_LISTED_ERRORS]) + more)


def validate_request(operation: str, params: Any) -> None:
    """Validate an operation's input against botocore's shape for it."""
    shape = operation_model(operation).input_shape
    validator = _Validator()
    if shape is None:
        return
    if not isinstance(params, dict):
        raise ValidationError("The request body must be a JSON object")
    validator.check(shape, params, "")
    raise_validation(validator.errors)


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds from a JSON-protocol number or an ISO 8601 string; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp()
    return None


def shape_output(operation: str, document: dict[str, Any]) -> dict[str, Any]:
    """Keep only the members of the operation's output shape (the wire never leaks internals)."""
    shape = operation_model(operation).output_shape
    if shape is None:
        return {}
    return _prune(shape, document)


def _prune(shape: Shape, value: Any) -> Any:
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        return {k: _prune(shape.members[k], v) for k, v in value.items() if k in shape.members and v is not None}
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [_prune(shape.member, v) for v in value]
    return value
