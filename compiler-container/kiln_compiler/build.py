"""Build a loaded model for a catalog target: TVM (Relax VM) or TL2cgen (tree ensembles)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.catalog import Family, Target

from .errors import ClientError, ServerError
from .loaders import LoadedModel
from .options import CompilerOptions

log = logging.getLogger(__name__)

# CPU features implied by common -mcpu values (x86), for the runtime's ISA check.
_X86_ISA = {
    "haswell": ("avx2", "fma"), "broadwell": ("avx2", "fma"), "skylake": ("avx2", "fma"),
    "x86-64-v3": ("avx2", "fma"), "znver2": ("avx2", "fma"), "znver3": ("avx2", "fma"),
    "skylake-avx512": ("avx2", "fma", "avx512f"), "cascadelake": ("avx2", "fma", "avx512f"),
    "icelake-server": ("avx2", "fma", "avx512f"), "sapphirerapids": ("avx2", "fma", "avx512f"),
    "x86-64-v4": ("avx2", "fma", "avx512f"), "x86-64": (), "x86-64-v2": ("sse4_2",),
}
LIB_NAMES = {Family.WINDOWS: "model.dll"}


@dataclass
class BuildResult:
    """Files produced by a build and what they need at run time."""

    files: list[Path]
    library: str
    runtime: str  # "tvm-relax-vm" | "tl2cgen"
    tvm_target: dict[str, Any] = field(default_factory=dict)
    isa: tuple[str, ...] = ()
    tuning: dict[str, int] = field(default_factory=lambda: {"tuned": 0, "reused": 0, "default": 0})


def effective_target(target: Target, options: CompilerOptions) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The TVM target dict after CompilerOptions (mcpu, mattr, gpu-code), and the ISA it requires."""
    tvm_target = dict(target.tvm_target)
    isa = target.isa
    if target.family == Family.CUDA:
        arch = options.gpu_code or target.cuda_arch
        if not arch:
            raise ClientError(f"target {target.name} needs the GPU architecture: set CompilerOptions "
                              "{\"gpu-code\": \"sm_XX\"}", section="OutputConfiguration")
        tvm_target["arch"] = arch
        host = target.host or {}
        if str(host.get("mtriple", "")).startswith("x86_64"):
            isa = _X86_ISA.get(str(host.get("mcpu", "")), isa)
        return tvm_target, isa
    if options.gpu_code:
        raise ClientError(f"CompilerOptions 'gpu-code' applies to NVIDIA targets only, not {target.name}",
                          section="OutputConfiguration")
    if target.family == Family.COREML:
        return tvm_target, isa
    if options.mcpu:
        tvm_target["mcpu"] = options.mcpu
        if target.family in (Family.X86_64, Family.WINDOWS):
            isa = _X86_ISA.get(options.mcpu, isa)
    if options.mattr:
        merged = list(tvm_target.get("mattr", []))
        merged += [m for m in options.mattr if m not in merged]
        tvm_target["mattr"] = merged
    return tvm_target, isa


def _check_llvm_target(tvm_target: dict[str, Any]) -> None:
    """Refuse an mcpu/mattr LLVM does not know, as a ClientError rather than a crash later."""
    import tvm

    try:
        tvm.target.Target(tvm_target)
    except Exception as exc:
        raise ClientError(f"CompilerOptions give an invalid target {tvm_target}: {str(exc).splitlines()[0][:200]}",
                          section="OutputConfiguration") from None


def _fcompile(target: Target) -> Any:
    from tvm.support import cc

    if target.toolchain is None:
        raise ServerError(f"target {target.name} has no toolchain in the catalog")
    if target.family == Family.WINDOWS:
        dll = windows_ffi_library(target)
        return cc.cross_compiler(target.toolchain.cxx, options=["-static-libgcc", "-static-libstdc++", str(dll)],
                                 output_format="dll")
    return cc.cross_compiler(target.toolchain.cxx)


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


def build_relax(model: LoadedModel, target: Target, options: CompilerOptions, out_dir: Path, *,
                tuning: Any = None, database: Any = None, deadline: float | None = None) -> BuildResult:
    """Compile a Relax module with the TVM pipeline and export a shared library."""
    from .tvm_pipeline import compile_relax

    tvm_target, isa = effective_target(target, options)
    _check_llvm_target(tvm_target)
    host, _ = effective_target(replace(target, tvm_target=target.host), options) if target.host else (None, ())
    if target.family == Family.CUDA:
        host = dict(target.host or {})
    try:
        compiled = compile_relax(model.mod, tvm_target, host=host, tuning=tuning, database=database,
                                 deadline=deadline)
    except ClientError:
        raise
    except Exception as exc:
        log.exception("TVM compilation failed")
        raise ClientError(
            f"the model could not be compiled for {target.name}: {_first_line(exc)}. An operator or shape in the "
            "model is probably not supported for this target"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIB_NAMES.get(target.family, "model.so")
    try:
        compiled.executable.export_library(str(lib), fcompile=_fcompile(target))
    except ServerError:
        raise
    except Exception as exc:
        log.exception("export_library failed")
        raise ServerError(f"linking the compiled model for {target.name} failed: {_first_line(exc)}") from None
    return BuildResult(files=[lib], library=lib.name, runtime="tvm-relax-vm", tvm_target=tvm_target, isa=isa,
                       tuning=dict(compiled.summary))


def _c_compiler(cxx: str) -> str:
    return cxx[:-3] + "gcc" if cxx.endswith("g++") else cxx


def build_tree(model: LoadedModel, target: Target, options: CompilerOptions, out_dir: Path) -> BuildResult:
    """Compile a Treelite model to C with TL2cgen and link it with the target's toolchain."""
    import tl2cgen

    if target.family in (Family.CUDA, Family.COREML) or target.toolchain is None:
        raise ClientError(f"tree ensembles ({model.framework}) compile for CPU targets only, not {target.name}",
                          section="OutputConfiguration")
    if options.mcpu or options.mattr:
        log.info("mcpu/mattr are passed to the C compiler for tree models")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIB_NAMES.get(target.family, "model.so")
    flags = ["-O3"] + ([f"-mcpu={options.mcpu}"] if options.mcpu and target.family in (
        Family.AARCH64, Family.ARMV7) else [f"-march={options.mcpu}"] if options.mcpu else [])
    if target.family == Family.ARMV7:
        flags.append("-mfloat-abi=hard")
    try:
        tl2cgen.export_lib(model.tree_model, toolchain=_c_compiler(target.toolchain.cxx), libpath=str(lib),
                           params={"parallel_comp": min(os.cpu_count() or 1, 8)}, options=flags,
                           nthread=os.cpu_count() or 1)
    except Exception as exc:
        log.exception("tl2cgen export failed")
        raise ServerError(f"building the tree model for {target.name} failed: {_first_line(exc)}") from None
    return BuildResult(files=[lib], library=lib.name, runtime="tl2cgen", tvm_target={}, isa=target.isa)


def build(model: LoadedModel, target: Target, options: CompilerOptions, out_dir: Path, *,
          tuning: Any = None, database: Any = None, deadline: float | None = None) -> BuildResult:
    """Dispatch on the model kind and check framework/target support."""
    if model.framework not in target.frameworks:
        raise ClientError(f"framework {model.framework} cannot be compiled for {target.name}; it supports "
                          f"{', '.join(target.frameworks)}", section="OutputConfiguration")
    if target.family == Family.COREML:
        raise ServerError("coreml targets are converted by kiln_compiler.coreml.convert, not built with TVM")
    if model.kind == "tree":
        return build_tree(model, target, options, out_dir)
    return build_relax(model, target, options, out_dir, tuning=tuning, database=database, deadline=deadline)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
