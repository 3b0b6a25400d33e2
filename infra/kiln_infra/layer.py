"""The Lambda layer with the functions' PyPI dependencies, built without Docker.

Lambda runs Python 3.11 on x86_64 Amazon Linux (glibc 2.26), so the layer holds manylinux
wheels for cp311/x86_64 under ``python/``. It is staged once in ``infra/build/lambda-layer``
(a stamp records the requirements it was built from) in the first way that works:

1. **reuse**: the staging directory exists and its stamp matches ``infra/lambda-requirements.txt``;
2. **copy**: the interpreter running the CDK app is CPython 3.11 on Linux x86_64 and has exactly
   the pinned distributions installed (the project's virtualenv does): their installed files are
   copied, with every dependency. Offline, and only when each wheel's tags fit Lambda;
3. **pip**: ``pip install --target --platform manylinux2014_x86_64 --python-version 3.11
   --only-binary=:all:`` (PyPI, or offline with ``PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse>``).

``make lambda-layer`` (``python -m kiln_infra.layer``) builds it ahead of synth.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kiln_infra.paths import LAMBDA_REQUIREMENTS, LAYER_BUILD_DIR

PYTHON_VERSION = "3.11"
PLATFORM = "manylinux2014_x86_64"
MAX_GLIBC = (2, 26)  # Amazon Linux 2, the OS of Lambda's python3.11 runtime
STAMP = ".requirements-sha256"
_MARKER_ENV = {"python_version": PYTHON_VERSION, "python_full_version": "3.11.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


class LayerBuildError(RuntimeError):
    """The layer could not be staged in any of the three ways."""


def requirements(path: Path = LAMBDA_REQUIREMENTS) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def _stamp(path: Path = LAMBDA_REQUIREMENTS) -> str:
    return hashlib.sha256(path.read_bytes() + f"|{PLATFORM}|{PYTHON_VERSION}".encode()).hexdigest()


def _wheel_fits_lambda(dist: md.Distribution) -> bool:
    wheel = dist.read_text("WHEEL") or ""
    for tag in re.findall(r"^Tag:\s*(\S+)", wheel, flags=re.M):
        python, abi, plat = tag.split("-")
        if plat == "any":
            return True
        if "cp311" not in python.split(".") or abi not in ("cp311", "abi3", "none"):
            continue
        for one in plat.split("."):
            if one in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"):
                return True
            found = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", one)
            if found and (int(found[1]), int(found[2])) <= MAX_GLIBC:
                return True
    return False


def _closure(reqs: list[Requirement]) -> list[md.Distribution] | None:
    """The installed distributions the pinned requirements need; None if any is missing or off-pin."""
    seen: dict[str, md.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate(_MARKER_ENV)):
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            return None
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            return None
        seen[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return list(seen.values())


def _copy_installed(reqs: list[Requirement], target: Path) -> bool:
    if (sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11)
            or sys.platform != "linux" or platform.machine() != "x86_64"):
        return False
    dists = _closure(reqs)
    if dists is None or not all(_wheel_fits_lambda(d) for d in dists):
        return False
    for dist in dists:
        root = Path(str(dist.locate_file(""))).resolve()
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file))).resolve()
            if root not in source.parents or "__pycache__" in source.parts or not source.is_file():
                continue  # console scripts outside site-packages, bytecode
            dest = target / source.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    return True


def _pip_install(target: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--target", str(target), "--platform", PLATFORM, "--implementation", "cp",
               "--python-version", PYTHON_VERSION, "--only-binary=:all:", "-r", str(LAMBDA_REQUIREMENTS)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LayerBuildError(
            "could not stage the Lambda layer: this interpreter is not CPython 3.11/Linux x86_64 with the "
            "pinned packages, and pip could not download them (offline? set PIP_NO_INDEX=1 and "
            f"PIP_FIND_LINKS=<wheelhouse>):\n{result.stderr[-2000:]}")


def build_layer(out_dir: Path = LAYER_BUILD_DIR, *, force: bool = False) -> Path:
    """Stage the layer (``out_dir/python/...``) unless an up-to-date one is there; return ``out_dir``."""
    stamp = out_dir / STAMP
    expected = _stamp()
    if not force and stamp.is_file() and stamp.read_text().strip() == expected:
        return out_dir
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    site = staging / "python"
    site.mkdir(parents=True)
    if not _copy_installed(requirements(), site):
        _pip_install(site)
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    (staging / STAMP).write_text(expected + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


if __name__ == "__main__":  # make lambda-layer
    print(build_layer(force="--force" in sys.argv))
