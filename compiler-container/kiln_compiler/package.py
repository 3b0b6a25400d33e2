"""Package a build into ``{basename}-{target}.tar.gz`` with a manifest."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln.catalog import Target

from .backends.base import BuildResult
from .errors import ClientError

MANIFEST = "manifest.json"
LABELS = "class_labels.txt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """The packaged tarball and its digest."""

    path: Path
    digest: str  # "sha256:<hex>"
    manifest: dict[str, Any]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def artifact_name(s3_uri: str, target_name: str) -> str:
    """``{input basename without .tar.gz}-{target}.tar.gz``."""
    base = s3_uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return f"{base or 'model'}-{target_name}.tar.gz"


def class_labels(model_dir: Path, name: str | None) -> Path | None:
    """The class-labels file named in CompilerOptions, looked up inside the archive."""
    if not name:
        return None
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ClientError(f"CompilerOptions class_labels '{name}' must be a file name inside the model archive")
    hits = [model_dir / rel] if (model_dir / rel).is_file() else sorted(model_dir.rglob(rel.name))
    hits = [h for h in hits if h.is_file() and not h.is_symlink()]
    if not hits:
        raise ClientError(f"the class_labels file '{name}' named in CompilerOptions is not in the model archive")
    return hits[0]


def build_manifest(result: BuildResult, target: Target, files: dict[str, Path],
                   job_name: str | None, labels: Path | None) -> dict[str, Any]:
    """The manifest describing the artifact (everything the runtime loader checks)."""
    model = result.model
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "job_name": job_name,
        "framework": model.framework,
        "framework_version": model.framework_version,
        "model_files": model.model_files,
        "target": {
            "name": target.name,
            "family": str(target.family),
            "tvm_target": result.tvm_target,
            "host": target.host,
            "isa": list(result.isa),
            "cuda_arch": result.tvm_target.get("arch") if str(target.family) == "cuda" else None,
            "machine": _machine(target),
        },
        "runtime": result.runtime,
        "library": result.library,
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
        "class_labels": LABELS if labels else None,
        "files": {name: "sha256:" + sha256_file(path) for name, path in sorted(files.items())},
        "tuning": result.tuning,
        "versions": {
            "kiln": _version("kiln"),
            "apache-tvm": _version("apache-tvm"),
            "apache-tvm-ffi": _version("apache-tvm-ffi"),
            "treelite": _version("treelite"),
            "tl2cgen": _version("tl2cgen"),
            "coremltools": _version("coremltools"),
            "python": platform.python_version(),
        },
    }
    if result.precision is not None:
        manifest["precision"] = result.precision  # deviation of a reduced-precision build from fp32
    if model.extra.get("coreml"):
        manifest["coreml"] = model.extra["coreml"]  # the converted spec's inputs/outputs, flexibility, classifier
    return manifest


def _machine(target: Target) -> str:
    if str(target.family) == "coreml":
        return ""  # Core ML packages are machine-independent; the runtime checks for an Apple platform
    mtriple = str((target.host or target.tvm_target).get("mtriple", ""))
    arch = mtriple.split("-", 1)[0]
    return {"armv7l": "armv7l", "i686": "i686"}.get(arch, arch) or "x86_64"


def _expand(paths: list[Path]) -> dict[str, Path]:
    """Artifact member name -> file; a directory (an .mlpackage) contributes every file under it."""
    files: dict[str, Path] = {}
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    files[str(Path(p.name) / f.relative_to(p))] = f
        else:
            files[p.name] = p
    return files


def stage(files: dict[str, Path], manifest: dict[str, Any], root: Path) -> Path:
    """The artifact's layout as a directory (links to the built files, and the manifest) that
    ``kiln.runtime.load`` opens as it opens the unpacked tarball: what the profile measures."""
    root.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        link = root / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return root


# Measures a staged artifact (its directory and manifest) and returns the manifest's "profile" member.
Profiler = Callable[[Path, dict[str, Any]], dict[str, Any]]


def package(result: BuildResult, target: Target, out_path: Path, *,
            model_dir: Path, job_name: str | None = None, labels_name: str | None = None,
            profiler: Profiler | None = None, accuracy: Profiler | None = None) -> Artifact:
    """Write the tarball (reproducible: fixed mtimes/owners, sorted) and return it with its digest.

    With a ``profiler``, the artifact is first staged and measured, and the manifest carries the profile
    (once, without writing the tarball twice); with ``accuracy``, its agreement with a reference too
    (``kiln_compiler.accuracy``)."""
    labels = class_labels(model_dir, labels_name)
    files = _expand(result.files)
    if labels:
        files[LABELS] = labels
    manifest = build_manifest(result, target, files, job_name, labels)
    if profiler is not None or accuracy is not None:
        with tempfile.TemporaryDirectory(prefix="kiln-stage-") as staged:
            root = stage(files, manifest, Path(staged) / "artifact")
            if accuracy is not None:
                manifest["accuracy"] = accuracy(root, manifest)
            if profiler is not None:
                manifest["profile"] = profiler(root, manifest)
    blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = [(MANIFEST, None), *sorted(files.items())]
        for name, path in entries:
            data = blob if path is None else path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return Artifact(out_path, "sha256:" + sha256_file(out_path), manifest)
