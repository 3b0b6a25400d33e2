"""kiln.runtime's host checks, without loading any library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kiln.runtime as rt
import pytest

MANIFEST = {"target": {"name": "ml_c5", "family": "x86_64", "machine": "x86_64", "isa": ["avx2", "fma", "avx512f"]}}


def test_missing_isa_is_named() -> None:
    # GIVEN an AVX-512 artifact and an AVX2-only CPU
    # WHEN the host is checked
    # THEN the error names the missing feature and suggests a target
    with pytest.raises(rt.IncompatibleHostError, match=r"CPU features \['avx512f'\].*ml_c4"):
        rt.check_host(MANIFEST, machine="x86_64", flags={"avx2", "fma", "sse4_2"})
    rt.check_host(MANIFEST, machine="x86_64", flags={"avx2", "fma", "avx512f"})


def test_wrong_machine_and_missing_gpu() -> None:
    # GIVEN aarch64 and CUDA artifacts
    arm = {"target": {"name": "ml_c6g", "family": "aarch64", "machine": "aarch64", "isa": []}}
    gpu = {"target": {"name": "ml_g4dn", "family": "cuda", "machine": "x86_64", "isa": [], "cuda_arch": "sm_75"}}
    # WHEN checked on an x86 host without a GPU
    # THEN each error says what is missing
    with pytest.raises(rt.IncompatibleHostError, match="needs a aarch64 machine; this host is x86_64"):
        rt.check_host(arm, machine="x86_64", flags=set())
    with pytest.raises(rt.IncompatibleHostError, match="needs an NVIDIA GPU"):
        rt.check_host(gpu, machine="x86_64", flags=set(), cuda_available=False)


def test_this_hosts_flags_are_read() -> None:
    # GIVEN this Linux host
    # WHEN /proc/cpuinfo is read
    flags = rt.cpu_flags()
    # THEN the usual x86/ARM flags are present
    assert flags is not None and ({"sse2"} <= flags or {"fp"} <= flags or "neon" in flags)


def test_runtime_imports_no_tvm() -> None:
    # GIVEN a fresh interpreter
    # WHEN kiln.runtime is imported
    code = "import sys, kiln.runtime; print('tvm' in sys.modules, 'tl2cgen' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # THEN neither TVM nor TL2cgen was imported
    assert out.split() == ["False", "False"]


def test_not_an_artifact(tmp_path: Path) -> None:
    # GIVEN a directory without a manifest
    # WHEN loaded
    # THEN ArtifactError
    with pytest.raises(rt.ArtifactError, match=r"manifest\.json missing"):
        rt.load(tmp_path)
