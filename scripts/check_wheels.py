#!/usr/bin/env python3
"""Check that the compiler image's pinned requirements install on a machine from wheels alone.

    check_wheels.py [--machine aarch64] [--machine x86_64] [--download DIR] [--extra-index-url URL]
                    [FILE[:PYTHON] ...]

For each machine (default: aarch64, the Graviton image) and each requirements file the compiler image
installs (default: requirements/compiler.txt with Python 3.11, requirements/mxnet.txt with 3.9), it

1. flattens the file (``-r`` includes) and evaluates its environment markers for *that* machine
   (pip's ``--platform`` does not: pip evaluates markers for the interpreter it runs on), and
2. lets pip resolve the result with ``--only-binary=:all: --platform manylinux_2_17..2_36_<machine>``
   (glibc 2.36: the image's Debian 12): ``pip install --dry-run`` (wheel metadata only, PEP 658), or with
   ``--download DIR`` ``pip download`` of every wheel.

Packages the Dockerfile builds from their sdist on a machine (BUILT_FROM_SDIST) are left out of the
wheel resolution; the index must hold the pinned sdist. Exit status 1 when anything does not resolve.
Limitation: markers of the pinned packages' own dependencies are still evaluated by pip for this host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# What compiler-container/Dockerfile installs: the main environment (3.11) and the MXNet one (3.9).
IMAGE_REQUIREMENTS = (("requirements/compiler.txt", "3.11"), ("requirements/mxnet.txt", "3.9"))
GLIBC_MINOR = 36  # python:3.11-slim-bookworm (Debian 12): glibc 2.36
# machine -> package -> why it is no wheel there (compiler-container/Dockerfile builds it from the sdist)
BUILT_FROM_SDIST = {
    "aarch64": {"tl2cgen": "no aarch64 wheel on PyPI: the Dockerfile's tl2cgen stage builds the pinned sdist "
                           "(cmake, ninja; its C++ dependencies at their release tags)"},
}
DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Resolved:
    wheels: list[str]  # file names pip chose
    sdists: list[str]  # "name==version (sha256 ...)" the Dockerfile builds


def platform_tags(machine: str) -> list[str]:
    """Every manylinux tag a glibc-2.36 machine accepts (pip does not expand a --platform downwards)."""
    return [f"manylinux2014_{machine}", *(f"manylinux_2_{minor}_{machine}" for minor in range(17, GLIBC_MINOR + 1))]


def marker_environment(machine: str, python: str) -> dict[str, str]:
    """The PEP 508 marker environment of CPython ``python`` on Linux ``machine``."""
    env = dict(default_environment())
    env.update(platform_machine=machine, sys_platform="linux", platform_system="Linux", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython",
               python_version=python, python_full_version=f"{python}.0")
    return env


def flatten(path: Path, env: dict[str, str], seen: set[Path] | None = None) -> list[Requirement]:
    """The requirements of ``path`` and its ``-r`` includes that apply in ``env``, markers dropped."""
    seen = seen if seen is not None else set()
    if path in seen:
        return []
    seen.add(path)
    found: list[Requirement] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            found += flatten(path.parent / line.split(None, 1)[1], env, seen)
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            found.append(req)
    return found


def index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def sdist_on_index(req: Requirement) -> str:
    """The pinned sdist of ``req`` on the index (PEP 691 JSON): its file name and sha256."""
    (spec,) = req.specifier
    name = canonicalize_name(req.name)
    request = urllib.request.Request(f"{index_url()}/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # the index pip is configured with
        files = json.load(response)["files"]
    stems = {f"{req.name}-{spec.version}.tar.gz", f"{name.replace('-', '_')}-{spec.version}.tar.gz"}
    for file in files:
        if file["filename"] in stems:
            return f"{file['filename']} (sha256 {file['hashes'].get('sha256', '?')})"
    raise LookupError(f"{req}: no sdist {sorted(stems)} on {index_url()}")


def resolve(path: Path, machine: str, python: str, *, download: Path | None = None,
            extra_index: str | None = None) -> Resolved:
    """Resolve ``path`` for ``machine``/``python`` from wheels only; raises RuntimeError with pip's error."""
    requirements = flatten(path, marker_environment(machine, python))
    from_sdist = BUILT_FROM_SDIST.get(machine, {})
    sdists = [f"{req} from {sdist_on_index(req)}" for req in requirements if canonicalize_name(req.name) in from_sdist]
    wheels_only = [req for req in requirements if canonicalize_name(req.name) not in from_sdist]
    with tempfile.TemporaryDirectory(prefix="kiln-wheels-") as tmp:
        flat = Path(tmp) / "requirements.txt"
        flat.write_text("".join(f"{req}\n" for req in wheels_only))
        report = Path(tmp) / "report.json"
        target = ["--only-binary=:all:", *(a for tag in platform_tags(machine) for a in ("--platform", tag)),
                  "--python-version", python, "--implementation", "cp", "-r", str(flat)]
        if extra_index:
            target += ["--extra-index-url", extra_index]
        if download is not None:
            command = ["download", "-d", str(download / machine / f"py{python}"), *target]
        else:
            command = ["install", "--dry-run", "--ignore-installed", "--target", str(Path(tmp) / "t"),
                       "--report", str(report), *target]
        done = subprocess.run([sys.executable, "-m", "pip", "-q", *command], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            raise RuntimeError("\n".join(errors) or done.stderr[-2000:])
        if download is not None:
            wheels = sorted(p.name for p in (download / machine / f"py{python}").glob("*.whl"))
        else:
            wheels = sorted(urllib.parse.unquote(item["download_info"]["url"].rsplit("/", 1)[-1])
                            for item in json.loads(report.read_text())["install"])
    return Resolved(wheels=wheels, sdists=sdists)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="FILE[:PYTHON] (default: what the compiler image installs)")
    parser.add_argument("--machine", action="append", choices=("aarch64", "x86_64"),
                        help="machine to check for (repeatable; default aarch64)")
    parser.add_argument("--download", type=Path, help="download every wheel into DIR/<machine>/py<version>")
    parser.add_argument("--extra-index-url", help="another index pip may take wheels from")
    args = parser.parse_args(argv)
    files = [(f.rsplit(":", 1) if ":" in f else (f, "3.11")) for f in args.files] or IMAGE_REQUIREMENTS
    failed = 0
    for machine in args.machine or ["aarch64"]:
        for name, python in files:
            path = Path(name) if Path(name).is_absolute() else REPO / name
            label = f"{machine} / Python {python}: {name}"
            try:
                resolved = resolve(path, machine, python, download=args.download, extra_index=args.extra_index_url)
            except (RuntimeError, LookupError) as exc:
                failed += 1
                print(f"FAIL {label}\n  {str(exc).replace(chr(10), chr(10) + '  ')}")
                continue
            print(f"ok   {label}: {len(resolved.wheels)} wheels")
            for wheel in resolved.wheels:
                print(f"       {wheel}")
            for sdist in resolved.sdists:
                print(f"     built from sdist by the Dockerfile: {sdist}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
