"""Parsing the user's ``DataInputConfig`` and ``CompilerOptions`` strings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kiln import rules

from .errors import ClientError


def _rule(parse: Any, *args: Any) -> Any:
    """Run a shared rule from ``kiln.rules`` (the API checks the same), mapping its error."""
    try:
        return parse(*args)
    except rules.RuleError as exc:
        raise ClientError(exc.message) from None


@dataclass(frozen=True)
class CompilerOptions:
    """The options Kiln honours; unknown keys are refused."""

    mcpu: str | None = None
    mattr: tuple[str, ...] = ()
    gpu_code: str | None = None
    dtype: str = "float32"
    class_labels: str | None = None
    allow_pickle: bool = False
    output_names: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | dict[str, Any] | None) -> CompilerOptions:
        """Parse the ``CompilerOptions`` string (JSON or Python literal)."""
        if raw is None or raw == "":
            return cls()
        data: dict[str, Any] = _rule(rules.parse_compiler_options, json.dumps(raw) if isinstance(raw, dict) else raw)
        outs = data.get("output_names", [])
        gpu = data.get("gpu-code")
        allow = bool(data.get("allow_pickle", False))
        mattr = data.get("mattr", [])
        dtype = data.get("dtype", "float32")
        return cls(
            mcpu=data.get("mcpu"),
            mattr=tuple(mattr),
            gpu_code=gpu,
            dtype=dtype,
            class_labels=data.get("class_labels"),
            allow_pickle=allow,
            output_names=tuple(outs) if isinstance(outs, list) else (str(outs),),
            raw=dict(data),
        )


@dataclass(frozen=True)
class DataInputConfig:
    """Input shapes the user declared: by name (dict form) or by position (list form)."""

    by_name: dict[str, tuple[int, ...]] = field(default_factory=dict)
    by_position: tuple[tuple[int, ...], ...] = ()
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.by_name and not self.by_position

    @classmethod
    def parse(cls, raw: str | None, framework: str) -> DataInputConfig:
        """Parse the ``DataInputConfig`` string per the SageMaker reference (``kiln.rules``)."""
        if raw is None or raw.strip() in ("", "{}", "[]"):
            return cls()
        specs = _rule(rules.parse_data_input_config, raw, framework)
        by_name: dict[str, tuple[int, ...]] = {}
        by_position: list[tuple[int, ...]] = []
        for spec in specs:
            shape = spec.shape if spec.shape is not None else _coreml_default_shape(spec.coreml)
            if spec.name is None:
                by_position.append(shape)
            else:
                by_name[spec.name] = shape
        return cls(by_name=by_name, by_position=tuple(by_position))

    def to_json(self) -> str:
        """The canonical JSON form (dict form when names are known)."""
        if self.by_name:
            return json.dumps({k: list(v) for k, v in self.by_name.items()})
        return json.dumps([list(v) for v in self.by_position])


def _coreml_default_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """The static shape of a CoreML-style input (its default_shape, else its first enumerated shape)."""
    shape = spec.get("default_shape") or spec.get("shape") or []
    if shape and isinstance(shape[0], list):
        shape = shape[0]
    if not all(isinstance(d, int) for d in shape):
        raise ClientError("DataInputConfig: a range shape needs a default_shape to compile a static model")
    return tuple(shape)
