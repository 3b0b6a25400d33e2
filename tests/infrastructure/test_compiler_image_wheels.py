"""The arm64 compiler image's dependencies (docs/adr/0030): the pins resolve for linux/aarch64 from wheels, except
tl2cgen, which the Dockerfile builds from its pinned sdist; the x86_64 pins stay what they were."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path
from types import ModuleType

import pytest
from kiln.catalog import RUNNERS, Family, TargetCatalog

from tests.runtime.conftest import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_wheels.py"


@pytest.fixture(scope="module")
def wheels() -> ModuleType:
    """scripts/check_wheels.py."""
    return load_script("check_wheels")


def _pins(module: ModuleType, machine: str) -> dict[str, str]:
    reqs = module.flatten(REPO / "requirements" / "compiler.txt", module.marker_environment(machine, "3.11"))
    return {req.name: str(req.specifier) for req in reqs}


def test_markers_give_each_machine_its_packages_at_one_version(wheels: ModuleType) -> None:
    # GIVEN requirements/compiler.txt evaluated for each machine
    x86, arm = _pins(wheels, "x86_64"), _pins(wheels, "aarch64")
    # THEN x86_64 keeps its pins (tensorflow-cpu, coremltools, tl2cgen's wheel)
    assert x86["tensorflow-cpu"] == "==2.21.0" and x86["coremltools"] == "==9.0" and x86["tl2cgen"] == "==1.0.0"
    assert "tensorflow" not in x86
    # AND aarch64 gets PyPI's aarch64 TensorFlow at the same release, no coremltools, the same tl2cgen (from sdist)
    assert arm["tensorflow"] == x86["tensorflow-cpu"] and "tensorflow-cpu" not in arm and "coremltools" not in arm
    assert "tl2cgen" in wheels.BUILT_FROM_SDIST["aarch64"] and arm["tl2cgen"] == x86["tl2cgen"]
    # AND every other pin is the same on both machines
    assert {k: v for k, v in arm.items() if k != "tensorflow"} == {
        k: v for k, v in x86.items() if k not in ("tensorflow-cpu", "coremltools")}


def test_no_target_built_on_an_arm64_runner_needs_coremltools() -> None:
    # GIVEN every target of the catalog and the runner it is built on (TargetPlatform mcpus included)
    from kiln.catalog import PLATFORM_CPU_RUNNERS

    catalog = TargetCatalog()
    platforms = catalog.supported_platforms
    targets = [*(catalog.device(name) for name in catalog.supported_devices), *platforms.values()]
    arm64 = [t for t in targets if RUNNERS[t.runner].architecture == "arm64"]
    arm64 += [platforms[name] for (name, _), runner in PLATFORM_CPU_RUNNERS.items()
              if RUNNERS[runner].architecture == "arm64"]
    # THEN the arm64 image (which has no coremltools: x86_64 wheels only) never builds a Core ML target
    assert arm64, "the catalog has Graviton targets"
    assert all(t.family is not Family.COREML for t in arm64)
    assert all(RUNNERS[t.runner].architecture == "x86_64" for t in targets if t.family is Family.COREML)


def test_the_dockerfile_builds_tl2cgen_at_the_pinned_version_only_on_arm64() -> None:
    # GIVEN the compiler Dockerfile
    dockerfile = (REPO / "compiler-container" / "Dockerfile").read_text()
    # THEN its tl2cgen stage takes the version from requirements/compiler.txt (one pin), builds only for arm64,
    # and the image installs requirements/compiler.txt with that stage's wheels on the find-links path
    assert "grep '^tl2cgen==' /tmp/compiler.txt" in dockerfile and "tl2cgen==1" not in dockerfile
    assert 'if [ "$TARGETARCH" = "arm64" ]' in dockerfile.split("AS tl2cgen", 1)[1].split("FROM ", 1)[0]
    assert "COPY --from=tl2cgen /wheels /tmp/wheels" in dockerfile
    assert "pip install --find-links /tmp/wheels" in dockerfile and "-r /tmp/req/compiler.txt" in dockerfile


def _index_reachable() -> str | None:
    """None when the package index answers, else why not."""
    host = urllib.parse.urlsplit(load_script("check_wheels").index_url()).hostname or "pypi.org"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"the package index ({host}) is unreachable: {exc}"
    return None


@pytest.mark.slow
def test_every_pin_of_the_arm64_image_resolves_from_aarch64_wheels(tmp_path: Path) -> None:
    if (reason := _index_reachable()) is not None:
        pytest.skip(reason)
    # WHEN the check runs for the arm64 image (requirements/compiler.txt on 3.11, requirements/mxnet.txt on 3.9)
    done = subprocess.run([sys.executable, str(SCRIPT), "--machine", "aarch64"], capture_output=True, text=True,
                          timeout=900, check=False)
    # THEN both resolve from aarch64 wheels, TensorFlow's and MXNet's among them, and tl2cgen's sdist is named
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   aarch64 / Python 3.11: requirements/compiler.txt" in done.stdout
    assert "ok   aarch64 / Python 3.9: requirements/mxnet.txt" in done.stdout
    assert "tensorflow-2.21.0-cp311-cp311-manylinux" in done.stdout and "_aarch64.whl" in done.stdout
    assert "mxnet-1.9.1-py3-none-manylinux2014_aarch64.whl" in done.stdout
    assert "built from sdist by the Dockerfile: tl2cgen==1.0.0 from tl2cgen-1.0.0.tar.gz" in done.stdout


@pytest.mark.slow
def test_a_pin_without_an_aarch64_wheel_fails_the_check(tmp_path: Path) -> None:
    if (reason := _index_reachable()) is not None:
        pytest.skip(reason)
    # GIVEN a requirements file with a pin that has x86_64 wheels only and no marker
    bad = tmp_path / "bad.txt"
    bad.write_text("coremltools==9.0\n")
    # WHEN checked for aarch64  THEN the check fails and names the package
    done = subprocess.run([sys.executable, str(SCRIPT), "--machine", "aarch64", f"{bad}:3.11"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 1
    assert "FAIL aarch64 / Python 3.11" in done.stdout and "coremltools==9.0" in done.stdout
