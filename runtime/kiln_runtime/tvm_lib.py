"""TVM's runtime library without TVM's compiler: ``libtvm_runtime`` loaded through ``tvm_ffi``.

The platform wheels of kiln-runtime carry ``lib/libtvm_runtime.so`` (``tvm_runtime.dll`` on Windows)
and the CUDA runtime module, taken from the pinned apache-tvm wheel of the same platform. In a
development environment (editable install beside apache-tvm) the same files are found in the
installed ``tvm`` package, without importing it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np

_LIB = Path(__file__).parent / "lib"
_PREFIX, _SUFFIX = ("", ".dll") if sys.platform == "win32" else ("lib", ".so")
# DLPack device types (dlpack.h): what the VM is initialised with.
_CPU, _CUDA = 1, 2
_POOLED_ALLOCATOR = 2


class RuntimeLibraryError(RuntimeError):
    """TVM's runtime library (or its CUDA module) cannot be found or loaded on this host."""


def library_dirs() -> list[Path]:
    """Where the TVM runtime library is looked for: this package's ``lib/``, then an installed apache-tvm."""
    dirs = [_LIB]
    spec = importlib.util.find_spec("tvm") if "tvm" not in sys.modules else sys.modules["tvm"].__spec__
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "lib" for p in spec.submodule_search_locations]
    return dirs


def _find(stem: str) -> Path | None:
    name = f"{_PREFIX}{stem}{_SUFFIX}"
    return next((d / name for d in library_dirs() if (d / name).is_file()), None)


@functools.cache
def ffi() -> Any:
    """``tvm_ffi`` with ``libtvm_runtime`` loaded (RTLD_GLOBAL: model libraries resolve against it)."""
    import tvm_ffi

    path = _find("tvm_runtime")
    if path is None:
        raise RuntimeLibraryError(
            f"TVM's runtime library ({_PREFIX}tvm_runtime{_SUFFIX}) is not in {[str(d) for d in library_dirs()]}; "
            "install the kiln-runtime wheel built for this platform (make wheels)")
    if sys.platform == "win32":
        os.add_dll_directory(str(path.parent))
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi


def _preload_cudart() -> None:
    """libtvm_runtime_cuda needs libcudart; pip's nvidia-cuda-runtime keeps it in site-packages/nvidia."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(root).glob("*/lib/libcudart.so*")):
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


@functools.cache
def cuda() -> Any:
    """``tvm_ffi`` with TVM's CUDA runtime module loaded as well."""
    tvm_ffi = ffi()
    path = _find("tvm_runtime_cuda")
    if path is None:
        raise RuntimeLibraryError(f"TVM's CUDA runtime module is not in {[str(d) for d in library_dirs()]}")
    if sys.platform != "win32":
        _preload_cudart()
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise RuntimeLibraryError(f"TVM's CUDA runtime module cannot be loaded ({exc}); it needs the NVIDIA "
                                  "driver (libcuda) and the CUDA 13 runtime: pip install 'kiln-runtime[cuda]'") from None
    from . import cuda_jit

    cuda_jit.register(tvm_ffi, device_arch)
    return tvm_ffi


def device_arch(device_id: int = 0) -> str:
    """``sm_XY`` of a CUDA device (its compute capability X.Y)."""
    get_attr = ffi().get_global_func("runtime.GetDeviceAttr")
    return "sm_" + str(get_attr(_CUDA, device_id, 4)).replace(".", "")  # attribute 4: kComputeVersion


def cuda_present() -> bool:
    """Whether an NVIDIA GPU is usable here (driver, CUDA runtime and device 0)."""
    try:
        tvm_ffi = cuda()
    except RuntimeLibraryError:
        return False
    get_attr = tvm_ffi.get_global_func("runtime.GetDeviceAttr")
    return bool(get_attr(_CUDA, 0, 0))  # attribute 0: kExist


Parallel = Literal["kiln", "tvm"]


def use_kiln_parallel(library: Path) -> bool:
    """Point a loaded model library's parallel loops at Kiln's launcher (ADR 0032), when it has one.

    TVM fills the library's ``__TVMBackendParallelLaunch`` pointer with its own thread pool when it loads
    the library; artifacts from Kiln also carry ``kiln_parallel_launch``, whose threads claim chunks
    dynamically, so a descheduled worker does not stall a loop. Returns whether the pointer now points
    there (False for libraries without the launcher, e.g. older artifacts, and on Windows)."""
    if sys.platform == "win32":
        return False
    try:
        lib = ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy TVM loaded
        launch = ctypes.cast(lib.kiln_parallel_launch, ctypes.c_void_p).value
        pointer = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
    except (OSError, AttributeError, ValueError):
        return False
    pointer.value = launch
    return True


class RelaxVM:
    """A Relax VM executable from an exported library, initialised for one device."""

    def __init__(self, library: Path, *, gpu: bool = False, parallel: Parallel = "kiln") -> None:
        tvm_ffi = cuda() if gpu else ffi()
        self._ffi = tvm_ffi
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self._device = tvm_ffi.device("cuda" if gpu else "cpu", 0)
        self._cpu = tvm_ffi.device("cpu", 0)
        self._module = tvm_ffi.load_module(str(library))
        # Whether the kernels' parallel loops run on Kiln's launcher (True) or on TVM's thread pool.
        self.kiln_parallel = parallel == "kiln" and use_kiln_parallel(library)
        self._vm = self._module["vm_load_executable"]()
        init = [_CUDA, 0, _POOLED_ALLOCATOR] if gpu else []
        self._vm["vm_initialization"](*init, _CPU, 0, _POOLED_ALLOCATOR)  # the CPU runs shape functions
        self._main = self._vm["main"]

    def _to_device(self, array: np.ndarray) -> Any:
        # A fresh, aligned tensor (TVM's kernels assume their buffers' alignment), filled from numpy.
        dst = self._alloc(self._ffi.Shape(array.shape), self._ffi.dtype(str(array.dtype)), self._device, None)
        self._copy(self._ffi.from_dlpack(array), dst)
        return dst

    def _to_numpy(self, tensor: Any) -> np.ndarray:
        if tensor.device.dlpack_device_type() != _CPU:
            host = self._alloc(self._ffi.Shape(list(tensor.shape)), tensor.dtype, self._cpu, None)
            self._copy(tensor, host)
            tensor = host
        return np.from_dlpack(tensor).copy()

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Call ``main`` on the inputs; the outputs (one tensor or a tuple) as numpy arrays."""
        result = self._main(*[self._to_device(a) for a in arrays])
        items = [result] if isinstance(result, self._ffi.Tensor) else list(result)
        return [self._to_numpy(r) for r in items]
