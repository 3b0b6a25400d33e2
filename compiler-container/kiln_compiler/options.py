"""Parsing the user's ``DataInputConfig`` and ``CompilerOptions`` strings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import rules
from kiln.catalog import Target

from .errors import ClientError


def _rule(parse: Any, *args: Any) -> Any:
    """Run a shared rule from ``kiln.rules`` (the API checks the same), mapping its error."""
    try:
        return parse(*args)
    except rules.RuleError as exc:
        section = "OutputConfiguration" if exc.member.startswith("outputConfig") else "InputConfiguration"
        raise ClientError(exc.message, section=section) from None


_SHARD = re.compile(r"([1-9]\d*)/([1-9]\d*)")


@dataclass(frozen=True)
class Shard:
    """Tuning worker ``index`` of ``count`` (1-based, as the workflow names it: ``"2/3"``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` with 1 <= i <= N; ValueError otherwise (the workflow sets it, so a bad one is Kiln's bug)."""
        match = _SHARD.fullmatch(text.strip())
        if not match or int(match.group(1)) > int(match.group(2)):
            raise ValueError(f"KILN_TUNING_SHARD must be 'i/N' with 1 <= i <= N, got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """The name of this worker's record folder under the job's tuning prefix."""
        return f"shard-{self.index}-of-{self.count}"


@dataclass(frozen=True)
class TuningBudget:
    """A tuning budget: a number of trials, a time budget in seconds, or both (``CompilerOptions["tuning"]``)."""

    trials: int | None = None
    seconds: float | None = None
    trials_per_task: int = 64
    workers: int = 1  # tuning workers the job fans out to (ADR 0023); each tunes its share within this budget

    def max_trials(self, n_tasks: int) -> int:
        """Trial budget for ``n_tasks`` kernels (time-only budgets get a generous cap)."""
        if self.trials is not None:
            return self.trials
        return n_tasks * self.trials_per_task


@dataclass(frozen=True)
class QuantizeOptions:
    """``CompilerOptions["quantize"]``: quantize an fp32 model by calibration, then compile it (ADR 0027)."""

    dtype: str  # "int8" (kiln.rules.QUANTIZE_DTYPES)
    calibration: str  # as the user named it: a path in the model archive or an s3:// URI
    fetched: Path | None = None  # where the job put an s3:// calibration file it read through the job's role


@dataclass(frozen=True)
class CompilerOptions:
    """The options Kiln honours, checked by ``kiln.rules`` (the API checks the same at create)."""

    mcpu: str | None = None
    mattr: tuple[str, ...] = ()
    gpu_code: str | None = None
    dtype: str | None = None  # the input dtype asked for (PyTorch); None: the model's own
    class_labels: str | None = None
    allow_pickle: bool = False
    output_names: tuple[str, ...] = ()
    signature_def_key: str | None = None  # TensorFlow SavedModel signature (default serving_default)
    tuning: TuningBudget | None = None
    precision: str = "fp32"  # "bf16": convolutions in bf16 with fp32 accumulation (native-bf16 CPUs only)
    quantize: QuantizeOptions | None = None  # int8 by calibration (kiln_compiler.quantize)

    @classmethod
    def parse(cls, raw: str | dict[str, Any] | None, target: Target | None = None) -> CompilerOptions:
        """Parse the ``CompilerOptions`` string (JSON or Python literal) with the rules for ``target``."""
        if raw is None or raw == "":
            data: dict[str, Any] = _rule(rules.parse_compiler_options, None, target)
        else:
            data = _rule(rules.parse_compiler_options, json.dumps(raw) if isinstance(raw, dict) else raw, target)
        outs = data.get("output_names", [])
        tuning = data.get("tuning")
        return cls(
            mcpu=data.get("mcpu"),
            mattr=tuple(data.get("mattr", [])),
            gpu_code=data.get("gpu-code"),
            dtype=data.get("dtype"),
            class_labels=data.get("class_labels"),
            allow_pickle=bool(data.get("allow_pickle", False)),
            output_names=tuple(outs) if isinstance(outs, list) else (str(outs),),
            signature_def_key=data.get("signature_def_key"),
            tuning=None if tuning is None else TuningBudget(
                trials=tuning.get("trials"),
                seconds=None if tuning.get("minutes") is None else float(tuning["minutes"]) * 60.0,
                workers=rules.tuning_workers(data)),
            precision=str(data.get("precision", "fp32")),
            quantize=None if "quantize" not in data else QuantizeOptions(
                dtype=str(data["quantize"]["dtype"]), calibration=str(data["quantize"]["calibration"])),
        )


@dataclass(frozen=True)
class DataInputConfig:
    """Input shapes the user declared: by name (dict form) or by position (list form)."""

    by_name: dict[str, tuple[int, ...]] = field(default_factory=dict)
    by_position: tuple[tuple[int, ...], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.by_name and not self.by_position

    @classmethod
    def parse(cls, raw: str | None, framework: str, target: Target | None = None) -> DataInputConfig:
        """Parse the ``DataInputConfig`` string per the SageMaker reference (``kiln.rules``)."""
        if raw is None or raw.strip() in ("", "{}", "[]"):
            return cls()
        specs = _rule(rules.parse_data_input_config, raw, framework, target)
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
