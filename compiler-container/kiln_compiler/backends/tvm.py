"""The TVM backend: a Relax module from the loaders, compiled with Kiln's pipeline, linked per target."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kiln.catalog import Family, Target

from .. import quantize
from ..errors import ClientError, ServerError
from ..loaders import load_model
from ..options import DataInputConfig, Shard
from .base import LIB_NAMES, BuildResult, CompileRequest, effective_target, first_line

log = logging.getLogger(__name__)


def _check_llvm_target(tvm_target: dict[str, Any]) -> None:
    """Refuse an mcpu/mattr LLVM does not know, as a ClientError rather than a crash later."""
    import tvm

    try:
        tvm.target.Target(tvm_target)
    except Exception as exc:
        raise ClientError(f"CompilerOptions give an invalid target {tvm_target}: {str(exc).splitlines()[0][:200]}",
                          section="OutputConfiguration") from None


# Kiln's parallel launcher (ADR 0032): linked into every Linux artifact, used by kiln-runtime in place of TVM's pool.
PARALLEL_SOURCE = Path(__file__).with_name("kiln_parallel.c")


def _fcompile(target: Target, work_dir: Path) -> Any:
    from tvm.support import cc

    if target.toolchain is None:
        raise ServerError(f"target {target.name} has no toolchain in the catalog")
    if target.family == Family.WINDOWS:  # TVM's own thread pool: the launcher is POSIX threads only
        dll = windows_ffi_library(target)
        return cc.cross_compiler(target.toolchain.cxx, options=["-static-libgcc", "-static-libstdc++", str(dll)],
                                 output_format="dll")
    return cc.cross_compiler(target.toolchain.cxx, options=["-pthread"],
                             add_files=[str(parallel_object(target.toolchain.cxx, work_dir))])


def parallel_object(cxx: str, work_dir: Path) -> Path:
    """kiln_parallel.c compiled (as C) by the target's compiler driver into ``work_dir``."""
    obj = work_dir / "kiln_parallel.o"
    proc = subprocess.run([cxx, "-x", "c", "-std=gnu11", "-O2", "-fPIC", "-pthread", "-Wno-psabi", "-c", str(PARALLEL_SOURCE),
                           "-o", str(obj)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log.error("compiling %s failed: %s", PARALLEL_SOURCE.name, proc.stdout + proc.stderr)
        raise ServerError(f"compiling Kiln's parallel launcher with {cxx} failed")
    return obj


def windows_ffi_library(target: Target) -> Path:
    """tvm_ffi.dll (from the win_amd64 tvm-ffi wheel) that Windows artifacts link against.

    ``scripts/kiln_assets.py windows-ffi`` puts it under ``<sys.prefix>/share/kiln/windows`` for both
    `make install` (the venv) and the compiler image (/usr/local); KILN_WINDOWS_FFI_DIR overrides.
    """
    root = Path(os.environ.get("KILN_WINDOWS_FFI_DIR", str(Path(sys.prefix) / "share" / "kiln" / "windows")))
    dll = root / ("win32" if "i686" in str(target.tvm_target.get("mtriple", "")) else "win_amd64") / "tvm_ffi.dll"
    if not dll.is_file():
        log.error("tvm_ffi.dll not found at %s", dll)
        raise ServerError("the Windows TVM runtime library (tvm_ffi.dll) is missing from this compiler installation; "
                          "`make install` or scripts/kiln_assets.py windows-ffi provides it")
    return dll


def tune(request: CompileRequest, shard: Shard) -> dict[str, int]:
    """One tuning worker's share of the model's kernels (ADR 0023) into ``request.tuning_database``; no build."""
    from ..pipeline import tune_relax

    target, options = request.target, request.options
    if request.tuning_database is None:
        raise ServerError("a tuning worker needs a tuning database")
    model, _ = _load(request)
    tvm_target, _ = effective_target(target, options)
    _check_llvm_target(tvm_target)
    with request.stage("tune"):
        try:
            return tune_relax(model.mod, tvm_target, shard=shard, tuning=options.tuning,
                              database=request.tuning_database, host=dict(target.host) if target.host else None,
                              deadline=request.deadline, precision=options.precision)
        except Exception as exc:
            log.exception("tuning worker %s failed", shard)
            raise ServerError(f"tuning worker {shard} failed: {first_line(exc)}") from None


def compile(request: CompileRequest) -> BuildResult:
    """Load the model into Relax, compile it with the TVM pipeline and export a shared library."""
    from ..pipeline import compile_relax

    target, options = request.target, request.options
    model, quantized = _load(request)
    tvm_target, needs = effective_target(target, options)
    _check_llvm_target(tvm_target)
    host = dict(target.host) if target.host else None  # the CPU side of a GPU target, as the catalog gives it
    with request.stage("build"):
        try:
            compiled = compile_relax(model.mod, tvm_target, host=host, tuning=options.tuning,
                                     database=request.tuning_database, deadline=request.deadline,
                                     precision=options.precision)
            precision = _deviation(model, compiled.executable, tvm_target) if options.precision != "fp32" else None
            if quantized is not None:
                precision = quantize.deviation(quantized, compiled.executable, tvm_target)
        except ClientError:
            raise
        except Exception as exc:
            log.exception("TVM compilation failed")
            raise ClientError(
                f"the model could not be compiled for {target.name}: {first_line(exc)}. An operator or shape in "
                "the model is probably not supported for this target"
            ) from None
        request.out_dir.mkdir(parents=True, exist_ok=True)
        lib = request.out_dir / LIB_NAMES.get(target.family, "model.so")
        try:
            with tempfile.TemporaryDirectory(prefix="kiln-link-") as link_dir:
                compiled.executable.export_library(str(lib), fcompile=_fcompile(target, Path(link_dir)))
        except ServerError:
            raise
        except Exception as exc:
            log.exception("export_library failed")
            raise ServerError(f"linking the compiled model for {target.name} failed: {first_line(exc)}") from None
    return BuildResult(model=model, files=[lib], library=lib.name, runtime="tvm-relax-vm", tvm_target=tvm_target,
                       isa=needs, tuning=dict(compiled.summary), unscheduled=list(compiled.unscheduled),
                       precision=precision, qdq_model=quantized.qdq_file if quantized is not None else None)


def _load(request: CompileRequest) -> tuple[Any, quantize.Quantized | None]:
    """The model as the build takes it: loaded, and quantized by calibration when the options ask (ADR 0027)."""
    config = DataInputConfig.parse(request.data_input_config, request.framework, request.target)
    with request.stage("load"):
        model = load_model(request.framework, request.model_dir, config, request.options)
    if request.options.quantize is None:
        model.extra.pop("onnx_model", None)  # not needed: the build holds the weights once
        return model, None
    with request.stage("quantize"):
        quantized = quantize.quantize_loaded(model, request.model_dir, request.options.quantize,
                                             request.out_dir.parent / "quantize")
    return quantized.model, quantized


def _deviation(model: Any, executable: Any, tvm_target: dict[str, Any]) -> dict[str, Any]:
    """The reduced-precision build's deviation from an fp32 build of the same model (ADR 0022)."""
    from ..pipeline import compile_relax
    from . import deviation

    reason = deviation.why_not_here(tvm_target)
    if reason:
        return deviation.not_measured("bf16", reason)
    reference = compile_relax(model.mod, tvm_target)
    return deviation.measure(model, executable, reference.executable, "bf16")
