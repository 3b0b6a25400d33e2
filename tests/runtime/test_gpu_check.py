"""The GPU check, as far as it goes without a GPU: CUDA kernels of real artifacts compiled by kiln-runtime's
NVRTC path for every bundled architecture, the comparison rule, and the bundle's script refusing clearly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import kiln_runtime
import numpy as np
import pytest
from kiln import rules
from kiln.catalog import TargetCatalog
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig
from kiln_compiler.pipeline import compile_relax
from kiln_runtime import cuda_jit

from tests.runtime.conftest import compile_artifact, load_script

EM_CUDA = 190
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90")


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def bundler() -> ModuleType:
    return load_script("gpu_check_bundle")


def _cuda_source(model_dir: Path, arch: str) -> str:
    """The CUDA C source TVM puts into an ml_g4dn-style artifact (what the runtime compiles at load)."""
    target = TargetCatalog().device("ml_g4dn")
    loaded = load_model("ONNX", model_dir, DataInputConfig.parse(None, "ONNX", target), CompilerOptions())
    compiled = compile_relax(loaded.mod, {"kind": "cuda", "arch": arch}, host=dict(target.host or {}))
    pending: list[Any] = [compiled.executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return str(module.inspect_source())
        pending += list(module.imports)
    raise AssertionError("no CUDA module in the build")


@pytest.mark.parametrize("model", ["tiny", pytest.param("squeezenet", marks=pytest.mark.slow)])
def test_nvrtc_compiles_the_kernels_for_every_bundled_gpu(model: str, tiny_model_dir: Path, squeezenet_dir: Path
                                                          ) -> None:
    # GIVEN the CUDA source of a real build (the tiny network, SqueezeNet)
    source = _cuda_source(tiny_model_dir if model == "tiny" else squeezenet_dir, "sm_75")
    assert source.count("__global__") >= 2
    for arch in ARCHS:
        # WHEN kiln-runtime's NVRTC path compiles it for each GPU of the bundle
        cubin = cuda_jit.compile_cuda(source, arch)
        # THEN each result is a CUDA ELF image (what cuModuleLoadData takes)
        assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == EM_CUDA, arch


def test_nvrtc_errors_carry_the_compiler_log() -> None:
    # GIVEN CUDA source with an error
    # WHEN it is compiled
    # THEN the error quotes NVRTC's log
    with pytest.raises(cuda_jit.CudaCompileError, match="undefined_thing"):
        cuda_jit.compile_cuda('extern "C" __global__ void k(float* x) { x[0] = undefined_thing; }', "sm_80")


def test_cuda_artifact_is_refused_without_a_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN the tiny network built for an NVIDIA platform (AVX2 host code, so only the GPU is missing here)
    artifact = compile_artifact(tiny_model_dir, "ONNX", "LINUX:X86_64:NVIDIA", tmp_path, options='{"gpu-code": "sm_80"}')
    # WHEN it is loaded on this host, which has no GPU
    # THEN the error says an NVIDIA GPU is needed
    with pytest.raises(kiln_runtime.IncompatibleHostError, match=r"needs an NVIDIA GPU \(CUDA sm_80\)"):
        kiln_runtime.load(artifact)


def test_compare_rule(gpu_check: ModuleType) -> None:
    # GIVEN a reference and outputs: equal within rounding, off by more, of another shape
    ref = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    # WHEN compared
    close = gpu_check.compare(ref + 1e-6, ref, rtol=1e-3, atol=1e-5)
    far = gpu_check.compare(ref + 0.1, ref, rtol=1e-3, atol=1e-5)
    shape = gpu_check.compare(ref.reshape(4, 3), ref, rtol=1e-3, atol=1e-5)
    # THEN only the first matches, each with its max abs error or the reason
    assert close["match"] and close["max_abs_error"] == pytest.approx(1e-6, rel=0.5)
    assert not far["match"] and far["max_abs_error"] == pytest.approx(0.1, rel=1e-3)
    assert not shape["match"] and "shape [4, 3] != [3, 4]" in shape["why"]


@pytest.mark.slow
def test_bundle_installs_offline_and_refuses_without_a_gpu(bundler: ModuleType, tmp_path: Path) -> None:
    # GIVEN a bundle with SqueezeNet for a T4 and for an sm_90 platform build, wheels for this Python
    out = bundler.bundle(tmp_path / "gpu-check", models=("squeezenet",), targets=("ml_g4dn-sm_75", "platform-sm_90"),
                         pythons=("3.11",))
    entries = json.loads((out / "bundle.json").read_text())["artifacts"]
    assert [(e["target"], e["cuda_arch"]) for e in entries] == [("ml_g4dn-sm_75", "sm_75"), ("platform-sm_90", "sm_90")]
    for entry in entries:
        assert np.load(out / entry["reference_file"]).shape == (1, 1000, 1, 1) and entry["atol"] > 0
    # WHEN its gpu-check runs here: no network index (--no-index), a fresh virtualenv, no GPU
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["KILN_GPU_CHECK_VENV"] = str(tmp_path / "venv")
    run = subprocess.run([str(out / "gpu-check")], env=env, capture_output=True, text=True, timeout=900, check=False)
    # THEN kiln-runtime[cuda] installed from the bundle alone, and the check refuses clearly (exit 3)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "no NVIDIA GPU is usable here" in run.stderr and "Traceback" not in run.stderr
    installed = subprocess.run([str(tmp_path / "venv/bin/python"), "-m", "pip", "list", "--format=freeze"], env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "kiln-runtime==0.1.0" in installed and "nvidia-cuda-nvrtc==13.0.88" in installed


def test_every_bundled_gpu_target_is_one_create_accepts(bundler: ModuleType) -> None:
    # GIVEN the targets the GPU check bundle compiles (TargetDevice or OS:ARCH:ACCELERATOR, CompilerOptions)
    catalog = TargetCatalog()
    for label, (target, options) in bundler.TARGETS.items():
        os_arch = target.split(":")
        resolved = catalog.device(target) if len(os_arch) == 1 else catalog.platform(*os_arch)
        # WHEN the create rules check it (the CUDA architecture rule included)
        parsed = rules.parse_compiler_options(options, resolved)
        # THEN it is accepted, for an architecture CUDA 13's NVRTC compiles for
        arch = parsed.get("gpu-code") or resolved.cuda_arch
        assert arch and rules.cuda_arch_supported(arch), label
