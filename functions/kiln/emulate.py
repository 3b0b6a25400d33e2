"""Run a foreign-architecture artifact on this build host under qemu-user, for checking numerics.

The emulated process is kiln-runtime's own ``kiln-run`` in an emulation root made by
``scripts/kiln_assets.py emulation-root`` (Debian's Python for that machine, numpy, apache-tvm-ffi
and the kiln-runtime wheel of that platform), so it exercises exactly what a device would install.
Emulation checks results, never speed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kiln_runtime import host_machine, normalise_machine
from kiln_runtime.manifest import extract, read_manifest

from kiln.catalog import TargetCatalog

DEFAULT_ROOTS = Path(sys.prefix) / "share" / "kiln" / "emulation"
TIMEOUT_SECONDS = 1800


class EmulationError(RuntimeError):
    """The artifact cannot be run emulated here, or the emulated run failed."""


@dataclass(frozen=True)
class Emulator:
    """qemu-user for one machine and the root holding its Python and kiln-runtime."""

    machine: str
    qemu: str
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "sysroot" / "usr" / "bin" / "python3.11"

    def command(self, *args: str) -> list[str]:
        """The argv that runs ``python3.11 ARGS`` of the root on the emulated CPU."""
        return [self.qemu, "-L", str(self.root / "sysroot"), str(self.python), *args]


def _qemu_for(machine: str) -> str:
    """The catalog's emulator for targets of this machine (the table the compiler's toolchains use)."""
    catalog = TargetCatalog()
    for name in catalog.supported_devices:
        toolchain = catalog.device(name).toolchain
        if toolchain and toolchain.emulator and _toolchain_machine(toolchain.cxx) == machine:
            return toolchain.emulator
    raise EmulationError(f"no emulator for {machine} artifacts in the target catalog")


def _toolchain_machine(cxx: str) -> str:
    arch = cxx.split("-", 1)[0]
    return normalise_machine("armv7l" if arch == "arm" else arch)


def emulator(machine: str, roots: Path = DEFAULT_ROOTS) -> Emulator:
    """The emulator for ``machine``; EmulationError naming what is missing."""
    qemu = _qemu_for(machine)
    if shutil.which(qemu) is None:
        raise EmulationError(f"{qemu} is not installed: `make install` installs it (requirements/debian.txt)")
    emu = Emulator(machine, qemu, roots / machine)
    if not emu.python.is_file():
        raise EmulationError(
            f"no emulation root for {machine} in {roots}: `make install` builds the aarch64 one "
            "(scripts/kiln_assets.py emulation-root aarch64); armv7 has none: there is no armv7 TVM runtime "
            "library, and the pinned TVM 0.27 cannot be built for armv7 from what its registries publish (no "
            "armv7 wheel, no source distribution, and the runtime sources in its wheels lack TVM's support "
            "headers such as tvm/support/serializer.h; docs/adr/0024-cuda-13-architectures-and-armv7.md)")
    return emu


def run(artifact: Path, feeds: dict[str, np.ndarray], *, roots: Path = DEFAULT_ROOTS) -> list[np.ndarray]:
    """Run ``artifact`` on ``feeds`` under qemu-user with that machine's kiln-runtime; its outputs."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-emulate-")))
        root = Path(stack.enter_context(extract(artifact))) if artifact.is_file() else artifact
        manifest = read_manifest(root)
        machine = normalise_machine(str(manifest.get("target", {}).get("machine", "")))
        if not machine or machine == host_machine():
            raise EmulationError(f"artifact for {manifest.get('target', {}).get('name')} runs natively here "
                                 "(kiln run without --emulate)")
        emu = emulator(machine, roots)
        args: list[str] = []
        for name, value in feeds.items():
            path = work / f"input-{len(args)}.npy"
            np.save(path, value)
            args += ["--input", f"{name}={path}"]
        out = work / "out"
        result = subprocess.run(
            emu.command("-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                        "from kiln_runtime.cli import main; sys.exit(main(sys.argv[1:]))",
                        str(emu.root / "site"), str(root), *args, "--output-dir", str(out)),
            capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
        if result.returncode != 0:
            raise EmulationError(f"the emulated {machine} run failed (exit {result.returncode}): "
                                 f"{result.stderr.strip()[-2000:]}")
        count = len(list(out.glob("output_*.npy")))
        return [np.load(out / f"output_{i}.npy") for i in range(count)]
