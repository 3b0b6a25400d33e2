"""Parsing the user's ``DataInputConfig`` and ``CompilerOptions`` strings."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ClientError

KNOWN_OPTIONS = frozenset(
    {"mcpu", "mattr", "gpu-code", "cuda-ver", "trt-ver", "dtype", "class_labels", "allow_pickle",
     "ANDROID_PLATFORM", "output_names", "signature_def_key", "tuning"}
)
_DTYPES = {"float": "float32", "float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
           "int8": "int8", "uint8": "uint8", "bool": "bool", "float64": "float64"}


def _parse_literal(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ClientError(f"{what} is neither JSON nor a Python literal: {raw[:200]!r}") from None


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
        data = raw if isinstance(raw, dict) else _parse_literal(raw, "CompilerOptions")
        if not isinstance(data, dict):
            raise ClientError("CompilerOptions must be a JSON object such as {\"mcpu\": \"haswell\"}")
        unknown = sorted(set(data) - KNOWN_OPTIONS)
        if unknown:
            raise ClientError(f"unknown CompilerOptions {unknown}; supported: {sorted(KNOWN_OPTIONS)}")
        mattr = data.get("mattr", [])
        if isinstance(mattr, str):
            mattr = [m for m in mattr.split(",") if m]
        if not isinstance(mattr, list) or not all(isinstance(m, str) and m[:1] in "+-" for m in mattr):
            raise ClientError("CompilerOptions 'mattr' must be a list of CPU flags such as ['+neon']")
        dtype = str(data.get("dtype", "float32")).lower()
        if dtype not in _DTYPES:
            raise ClientError(f"CompilerOptions 'dtype' {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        gpu = data.get("gpu-code")
        if gpu is not None and not (isinstance(gpu, str) and gpu.startswith("sm_") and gpu[3:].isdigit()):
            raise ClientError(f"CompilerOptions 'gpu-code' must look like 'sm_75', got {gpu!r}")
        for key in ("mcpu", "class_labels"):
            if key in data and not isinstance(data[key], str):
                raise ClientError(f"CompilerOptions '{key}' must be a string")
        allow = data.get("allow_pickle", False)
        if not isinstance(allow, bool):
            raise ClientError("CompilerOptions 'allow_pickle' must be true or false")
        outs = data.get("output_names", [])
        return cls(
            mcpu=data.get("mcpu"),
            mattr=tuple(mattr),
            gpu_code=gpu,
            dtype=_DTYPES[dtype],
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

    @staticmethod
    def _shape(value: Any, where: str) -> tuple[int, ...]:
        if isinstance(value, dict):  # {"shape": [...], "default_shape": [...]} (CoreML style)
            value = value.get("default_shape") or value.get("shape")
            if value and isinstance(value[0], list):
                value = value[0]
        if not isinstance(value, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                           for d in value):
            raise ClientError(f"DataInputConfig shape for {where} must be a list of integers, got {value!r}")
        if any(d <= 0 for d in value):
            raise ClientError(f"DataInputConfig shape for {where} has a non-positive dimension: {list(value)}")
        return tuple(value)

    @classmethod
    def parse(cls, raw: str | None, framework: str) -> DataInputConfig:
        """Parse the ``DataInputConfig`` string per the SageMaker reference."""
        if raw is None or raw.strip() in ("", "{}", "[]"):
            return cls()
        data = _parse_literal(raw, "DataInputConfig")
        if isinstance(data, dict):
            dtypes = {k: _DTYPES[str(v["dtype"]).lower()] for k, v in data.items()
                      if isinstance(v, dict) and str(v.get("dtype", "")).lower() in _DTYPES}
            return cls(by_name={str(k): cls._shape(v, f"input '{k}'") for k, v in data.items()}, dtypes=dtypes)
        if isinstance(data, list):
            if data and all(isinstance(d, int) for d in data):
                data = [data]  # a single bare shape
            return cls(by_position=tuple(cls._shape(v, f"input #{i}") for i, v in enumerate(data)))
        raise ClientError(
            f"DataInputConfig for {framework} must be a dictionary of input name to shape, "
            "for example {\"data\": [1, 3, 224, 224]}"
        )

    def to_json(self) -> str:
        """The canonical JSON form (dict form when names are known)."""
        if self.by_name:
            return json.dumps({k: list(v) for k, v in self.by_name.items()})
        return json.dumps([list(v) for v in self.by_position])
