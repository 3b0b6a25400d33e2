"""CUDA kernels of an artifact compiled for the GPU at hand, when the library is loaded.

TVM 0.27 exports CUDA modules as CUDA C source (format ``cuda``); its runtime compiles them on load
through the global function ``tvm_callback_cuda_compile``, which TVM's Python package registers with
NVRTC from ``cuda-bindings`` and a CUDA toolkit. kiln-runtime registers its own: NVRTC through ctypes,
with the headers of NVIDIA's pip wheels (``pip install kiln-runtime[cuda]``: nvidia-cuda-nvrtc,
nvidia-cuda-runtime, nvidia-cuda-cccl; pinned in requirements/runtime-cuda.txt). The kernels are
compiled to a cubin for the device's own compute capability.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What TVM's own NVRTC path adds (tvm/support/nvcc.py): NVRTC has no host <stdint.h> or <cuda.h>.
_PREAMBLE = """#include <cuda/std/cstdint>
using cuda::std::uint8_t;
using cuda::std::uint16_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::int8_t;
using cuda::std::int16_t;
using cuda::std::int32_t;
using cuda::std::int64_t;
"""
_OPTIONS = ("-default-device", "--device-int128", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--use_fast_math",
            "-D__NV_SILENCE_DEPRECATION_BEGIN=", "-D__NV_SILENCE_DEPRECATION_END=",
            "-D__NV_SILENCE_HOST_DEPRECATION_BEGIN=", "-D__NV_SILENCE_HOST_DEPRECATION_END=")


class CudaCompileError(RuntimeError):
    """NVRTC is missing, or it could not compile the artifact's kernels."""


def _cuda_roots() -> list[Path]:
    """``site-packages/nvidia/cu13`` (and other cuXX) folders of NVIDIA's pip wheels."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return sorted((d for r in roots for d in r.glob("cu*") if d.is_dir()), reverse=True)


def include_dirs() -> list[Path]:
    """Header folders NVRTC needs: the CUDA runtime headers and CCCL (cuda/std)."""
    dirs = []
    for root in _cuda_roots():
        dirs += [d for d in (root / "include", root / "include" / "cccl") if d.is_dir()]
    return dirs


@functools.cache
def _nvrtc() -> Any:
    for root in _cuda_roots():
        for lib in sorted((root / "lib").glob("libnvrtc.so.*")):
            for builtins in sorted((root / "lib").glob("libnvrtc-builtins.so.*")):  # dlopen()ed by NVRTC by name
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(str(lib))
    try:
        return ctypes.CDLL("libnvrtc.so")
    except OSError:
        raise CudaCompileError("NVRTC (libnvrtc) is not installed; CUDA artifacts are compiled for the GPU when "
                               "loaded: pip install 'kiln-runtime[cuda]'") from None


def _check(nvrtc: Any, result: int, what: str, program: ctypes.c_void_p | None = None) -> None:
    if result == 0:
        return
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    message = nvrtc.nvrtcGetErrorString(result).decode()
    if program is not None:
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        message += ": " + log.value.decode(errors="replace")[-4000:]
    raise CudaCompileError(f"NVRTC {what} failed: {message}")


def supported_archs() -> tuple[tuple[int, int], list[int]]:
    """NVRTC's version and the compute capabilities it compiles for (``[75, 80, ...]``); needs no GPU."""
    nvrtc = _nvrtc()
    major, minor, count = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _check(nvrtc, nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
    _check(nvrtc, nvrtc.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "architecture count")
    archs = (ctypes.c_int * count.value)()
    _check(nvrtc, nvrtc.nvrtcGetSupportedArchs(archs), "architectures")
    return (major.value, minor.value), list(archs)


def compile_cuda(source: str, arch: str) -> bytes:
    """CUDA C source -> a cubin for ``arch`` (``sm_86``)."""
    nvrtc = _nvrtc()
    code = _PREAMBLE + "\n".join(line for line in source.splitlines() if line.strip() != "#include <cuda.h>")
    program = ctypes.c_void_p()
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kiln_kernels.cu", 0, None, None),
           "create")
    try:
        options = [f"--gpu-architecture={arch}", *_OPTIONS, *(f"-I{d}" for d in include_dirs())]
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        _check(nvrtc, nvrtc.nvrtcCompileProgram(program, len(options), argv), "compile", program)
        size = ctypes.c_size_t()
        _check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin), "cubin")
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def register(tvm_ffi: Any, device_arch: Callable[[], str]) -> None:
    """Make ``tvm_callback_cuda_compile`` compile with NVRTC for ``device_arch()`` (unless one is registered)."""
    if tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True) is not None:
        return  # TVM's Python package (the compiler environment) registered its own

    def tvm_callback_cuda_compile(source: str, *_: Any) -> bytes:
        return compile_cuda(str(source), device_arch())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", tvm_callback_cuda_compile)
