"""Load and run a Kiln artifact: ``kiln.runtime.load(path).run({name: array})``.

The artifact's ``manifest.json`` says what the library needs (machine, CPU features,
CUDA); ``load`` checks this host first and raises :class:`IncompatibleHostError` naming
what is missing. TVM and TL2cgen are imported only when a model is actually loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv7": "armv7l", "armv8l": "armv7l",
                    "i386": "i686", "x86": "i686"}


class ArtifactError(Exception):
    """The artifact is malformed or was tampered with."""


class IncompatibleHostError(RuntimeError):
    """This host cannot run the artifact (wrong machine, missing CPU features, no GPU)."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in manifests."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))


def host_machine() -> str:
    """This host's machine name, normalised (x86_64, aarch64, armv7l, i686)."""
    m = platform.machine().lower()
    return _MACHINE_ALIASES.get(m, m)


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
    machine = machine or host_machine()
    want = _MACHINE_ALIASES.get(str(target.get("machine", "")), str(target.get("machine", "")))
    if family == "coreml" and (system or platform.system()) != "Darwin":
        raise IncompatibleHostError(
            f"artifact for {name} is a Core ML model package ({manifest.get('library')}); Core ML runs only on Apple "
            f"devices (macOS, iOS, iPadOS, watchOS, tvOS, visionOS), not on {system or platform.system()}. Copy the "
            ".mlpackage to an Apple device or Xcode project, or compile for a Linux target to run it here")
    if family == "windows" and platform.system() != "Windows":
        raise IncompatibleHostError(f"artifact for {name} is a Windows DLL; this host runs {platform.system()}")
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
            cuda_available = _cuda_present()
        if not cuda_available:
            raise IncompatibleHostError(f"artifact for {name} needs an NVIDIA GPU (CUDA {target.get('cuda_arch')}); "
                                        "none is visible on this host")


def _cuda_present() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Model:
    """A loaded artifact."""

    def __init__(self, root: Path, manifest: dict[str, Any], keepalive: Any = None) -> None:
        self.root = root
        self.manifest = manifest
        self.inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in manifest["outputs"]]
        self.class_labels: list[str] | None = None
        if manifest.get("class_labels"):
            self.class_labels = (root / manifest["class_labels"]).read_text().splitlines()
        self._keepalive = keepalive
        self._impl: Any = None
        self._load()

    def _load(self) -> None:
        lib = str(self.root / self.manifest["library"])
        if self.manifest["runtime"] == "coreml":  # only reached on macOS (check_host), or with check=False
            import coremltools

            self._impl = coremltools.models.MLModel(lib)
            return
        if self.manifest["runtime"] == "tl2cgen":
            import tl2cgen

            self._impl = tl2cgen.Predictor(lib, nthread=int(os.environ.get("TVM_NUM_THREADS", "0")) or None)
            return
        import tvm
        from tvm import relax

        family = self.manifest["target"].get("family")
        self._device = tvm.cuda(0) if family == "cuda" else tvm.cpu(0)
        self._lib = tvm.runtime.load_module(lib)
        self._impl = relax.VirtualMachine(self._lib, self._device)

    def _check(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [s.name for s in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; the model's inputs are {names}")
        arrays = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ValueError(f"missing input '{spec.name}' (shape {list(spec.shape)}, {spec.dtype})")
            arr = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            ok = len(arr.shape) == len(spec.shape) and all(
                d < 0 or d == a for d, a in zip(spec.shape, arr.shape, strict=True))
            if not ok:
                raise ValueError(f"input '{spec.name}' has shape {list(arr.shape)}; the model expects "
                                 f"{list(spec.shape)} (-1 = any)")
            arrays.append(arr)
        return arrays

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on named inputs; returns the outputs in manifest order."""
        if self.manifest["runtime"] == "coreml":
            result = self._impl.predict(feeds)  # Image inputs take PIL images, as Core ML does
            return [result[o.name] for o in self.outputs]
        arrays = self._check(feeds)
        if self.manifest["runtime"] == "tl2cgen":
            import tl2cgen

            out = self._impl.predict(tl2cgen.DMatrix(arrays[0]))
            return [np.asarray(out)]
        import tvm

        args = [tvm.runtime.tensor(a, self._device) for a in arrays]
        result = self._impl["main"](*args)
        items = list(result) if not hasattr(result, "numpy") else [result]
        return [r.numpy() for r in items]


def _extract(archive: Path) -> tempfile.TemporaryDirectory[str]:
    tmp = tempfile.TemporaryDirectory(prefix="kiln-artifact-")
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(tmp.name, filter="data")
    return tmp


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and integrity-check ``manifest.json`` (every listed file's sha256)."""
    try:
        manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root} is not a Kiln artifact: {MANIFEST} missing or invalid ({exc})") from None
    for name, digest in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"artifact file '{name}' listed in the manifest is missing")
        if _sha256(path) != digest:
            raise ArtifactError(f"artifact file '{name}' does not match its manifest digest")
    return manifest


def load(path: str | os.PathLike[str], *, check: bool = True) -> Model:
    """Load an artifact directory or ``.tar.gz`` after checking that this host can run it."""
    p = Path(path)
    keepalive = None
    if p.is_file():
        keepalive = _extract(p)
        p = Path(keepalive.name)
    manifest = read_manifest(p)
    if check:
        check_host(manifest)
    return Model(p, manifest, keepalive)
