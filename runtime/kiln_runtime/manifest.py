"""An artifact's ``manifest.json``: what the library needs, its inputs and outputs, file digests."""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class ArtifactError(Exception):
    """The artifact is malformed or was tampered with."""


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and integrity-check ``manifest.json`` (every listed file's sha256)."""
    try:
        manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root} is not a Kiln artifact: {MANIFEST} missing or invalid ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{root} is not a Kiln artifact: {MANIFEST} is not a JSON object")
    for name, digest in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"artifact file '{name}' listed in the manifest is missing")
        if _sha256(path) != digest:
            raise ArtifactError(f"artifact file '{name}' does not match its manifest digest")
    return manifest


def extract(archive: Path) -> tempfile.TemporaryDirectory[str]:
    """Unpack an artifact ``.tar.gz`` into a temporary directory (tarfile's ``data`` filter)."""
    tmp = tempfile.TemporaryDirectory(prefix="kiln-artifact-")
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp.name, filter="data")
    except (tarfile.TarError, OSError) as exc:
        tmp.cleanup()
        raise ArtifactError(f"{archive} is not a Kiln artifact archive ({exc})") from None
    return tmp
