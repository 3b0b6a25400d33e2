"""Can this host run an artifact? Machine, CPU features, operating system, GPU.

The runtime only compares the feature names the manifest lists (written by the compiler from its
ISA table) with the host's ``/proc/cpuinfo`` flags; it holds no table of CPUs of its own.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv7": "armv7l", "armv8l": "armv7l",
                    "i386": "i686", "x86": "i686"}


class IncompatibleHostError(RuntimeError):
    """This host cannot run the artifact (wrong machine, missing CPU features, no GPU)."""


def normalise_machine(name: str) -> str:
    """A machine name in Kiln's spelling (x86_64, aarch64, armv7l, i686)."""
    m = name.lower()
    return _MACHINE_ALIASES.get(m, m)


def host_machine() -> str:
    """This host's machine name, normalised (x86_64, aarch64, armv7l, i686)."""
    return normalise_machine(platform.machine())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """CPU feature flags of this host, or None when they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def check_host(manifest: dict[str, Any], *, machine: str | None = None, flags: set[str] | None = None,
               cuda_available: bool | None = None, system: str | None = None) -> None:
    """Raise IncompatibleHostError unless this host can run the artifact described by ``manifest``."""
    target = manifest.get("target", {})
    name = target.get("name", "?")
    family = target.get("family")
    system = system or platform.system()
    machine = machine or host_machine()
    want = normalise_machine(str(target.get("machine", "")))
    if family == "coreml" and system != "Darwin":
        raise IncompatibleHostError(
            f"artifact for {name} is a Core ML model package ({manifest.get('library')}); Core ML runs only on Apple "
            f"devices (macOS, iOS, iPadOS, watchOS, tvOS, visionOS), not on {system}. Copy the "
            ".mlpackage to an Apple device or Xcode project, or compile for a Linux target to run it here")
    if family == "windows" and system != "Windows":
        raise IncompatibleHostError(f"artifact for {name} is a Windows DLL; this host runs {system}")
    if want and want != machine:
        raise IncompatibleHostError(f"artifact for {name} needs a {want} machine; this host is {machine}")
    isa = [str(f) for f in target.get("isa", [])]
    if isa:
        have = flags if flags is not None else cpu_flags()
        missing = [f for f in isa if have is not None and f not in have]
        if missing:
            raise IncompatibleHostError(
                f"artifact for {name} needs CPU features {missing} that this host's CPU lacks; "
                "compile for a target this CPU supports (for example ml_c4 for AVX2-only x86 hosts)"
            )
    if family == "cuda":
        if cuda_available is None:
            from . import tvm_lib

            cuda_available = tvm_lib.cuda_present()
        if not cuda_available:
            raise IncompatibleHostError(f"artifact for {name} needs an NVIDIA GPU (CUDA {target.get('cuda_arch')}); "
                                        "none is visible on this host")
