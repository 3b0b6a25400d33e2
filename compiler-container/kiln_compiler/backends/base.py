"""What every backend takes and returns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import isa
from kiln.catalog import Family, Target

from ..errors import ClientError, ServerError
from ..loaders import LoadedModel
from ..options import CompilerOptions

if TYPE_CHECKING:
    from ..tuning import TuningDatabase

LIB_NAMES = {Family.WINDOWS: "model.dll"}


@dataclass(frozen=True)
class CompileRequest:
    """One compilation: the unpacked model, what to build it for, and where to put the result."""

    model_dir: Path
    framework: str
    target: Target
    options: CompilerOptions
    out_dir: Path
    data_input_config: str | None = None  # the user's DataInputConfig string (its form depends on the backend)
    tuning_database: TuningDatabase | None = None  # records to apply (and extend with a budget), TVM CPU builds
    deadline: float | None = None  # epoch seconds by which the build must be done
    # Wraps each stage ("load", "build") so a caller can time and report it (the job's stage log).
    stage: Callable[[str], AbstractContextManager[object]] = field(default=lambda _name: contextlib.nullcontext())


@dataclass
class BuildResult:
    """A compiled model: the loaded model's description, the files produced and what they need at run time."""

    model: LoadedModel
    files: list[Path]
    library: str
    runtime: str  # "tvm-relax-vm" | "tl2cgen" | "coreml"
    tvm_target: dict[str, Any] = field(default_factory=dict)
    isa: tuple[str, ...] = ()
    tuning: dict[str, int] = field(default_factory=lambda: {"tuned": 0, "reused": 0, "default": 0})
    unscheduled: list[str] = field(default_factory=list)  # kernels left with TVM's unscheduled loops
    precision: dict[str, Any] | None = None  # a reduced-precision build's deviation from fp32 (backends.deviation)
    qdq_model: Path | None = None  # the QDQ model Kiln quantized by calibration (compared with ONNX Runtime on it)


def first_line(exc: BaseException) -> str:
    """The most telling line of an exception's message (TVM puts it last), for a failure reason."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def effective_target(target: Target, options: CompilerOptions) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The TVM target dict after CompilerOptions (mcpu, mattr, gpu-code), and the CPU features it requires.

    The options were checked for this target by ``kiln.rules`` (``CompilerOptions.parse``)."""
    tvm_target = dict(target.tvm_target)
    if target.family == Family.CUDA:
        arch = options.gpu_code or target.cuda_arch
        if not arch:
            raise ServerError(f"target {target.name} reached the compiler without a GPU architecture")
        tvm_target["arch"] = arch
        return tvm_target, target.isa
    if options.mcpu:
        tvm_target["mcpu"] = options.mcpu
    if options.mattr:
        merged = list(tvm_target.get("mattr", []))
        merged += [m for m in options.mattr if m not in merged]
        tvm_target["mattr"] = merged
    try:
        features = isa.target_features(tvm_target)
    except isa.UnknownCpuError as exc:
        raise ClientError(f"CompilerOptions: {exc}", section="OutputConfiguration") from None
    return tvm_target, features.runtime_check
