#!/usr/bin/env python3
"""Prepare the gpu-check bundle (`make gpu-check-bundle`): everything a GPU machine without network needs.

    build/gpu-check/
      gpu-check, gpu_check.py        the check (scripts/gpu-check, scripts/gpu_check.py)
      wheels/                        kiln-runtime (linux x86_64), its pinned dependencies and the [cuda] extra
      artifacts/<model>-<target>/    model.tar.gz compiled here, input.npy, reference.npy (ONNX Runtime)
      bundle.json                    what to run and the tolerances

Targets: ml_g4dn (T4, sm_75) as a TargetDevice; ml_g5 (A10G, sm_86), ml_p4d (A100, sm_80) and an sm_90
(H100/H200) build as TargetPlatform LINUX/X86_64/NVIDIA with CompilerOptions gpu-code, as a user asks for them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# label -> (TargetDevice or OS:ARCH:ACCELERATOR, CompilerOptions)
TARGETS: dict[str, tuple[str, str | None]] = {
    "ml_g4dn-sm_75": ("ml_g4dn", None),
    "ml_g5-sm_86": ("LINUX:X86_64:NVIDIA", '{"gpu-code": "sm_86"}'),
    "ml_p4d-sm_80": ("LINUX:X86_64:NVIDIA", '{"gpu-code": "sm_80"}'),
    "platform-sm_90": ("LINUX:X86_64:NVIDIA", '{"gpu-code": "sm_90"}'),
}
MODELS = ("squeezenet", "resnet50")
PYTHONS = ("3.11", "3.12", "3.13")  # the GPU machine's python3 picks its own wheels
# GPU kernels sum in other orders than ONNX Runtime's CPU kernels (and use fast math): float32 rounding.
RTOL, ATOL_OF_RANGE = 1e-3, 1e-3


def _assets() -> Any:
    spec = importlib.util.spec_from_file_location("kiln_assets", REPO / "scripts" / "kiln_assets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wheels(out: Path, pythons: tuple[str, ...]) -> None:
    """kiln-runtime's x86_64 wheel and every wheel `pip install kiln-runtime[cuda]` needs, for each Python."""
    assets = _assets()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets.build_wheel("manylinux_2_28_x86_64", assets.CACHE / "dist"), out)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                             "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                             "manylinux_2_12_x86_64", "manylinux2010_x86_64")]
    for version in pythons:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--only-binary=:all:", "--no-deps", *platforms, "--python-version", version,
                        "--implementation", "cp", "-d", str(out), "-r", str(REPO / "requirements/runtime.txt"),
                        "-r", str(REPO / "requirements/runtime-cuda.txt")], check=True)


def _compile(model_dir: Path, target: str, options: str | None, out: Path) -> Path:
    from kiln.catalog import TargetCatalog
    from kiln_compiler.compile import compile_model
    from kiln_compiler.options import CompilerOptions
    from kiln_compiler.package import package

    catalog = TargetCatalog()
    tgt = catalog.platform(*target.split(":")) if ":" in target else catalog.device(target)
    opts = CompilerOptions.parse(options, tgt)
    result = compile_model(model_dir, "ONNX", tgt, opts, out_dir=out / "build")
    artifact = package(result, tgt, out / "model.tar.gz", model_dir=model_dir).path
    shutil.rmtree(out / "build")
    return Path(artifact)


def artifacts(out: Path, models: tuple[str, ...], targets: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each model compiled for each CUDA target, with an input and ONNX Runtime's output for it."""
    import onnx
    import onnxruntime as ort
    from kiln_compiler.samples import load_light_model

    entries = []
    for name in models:
        model = load_light_model(name, 0, strip_softmax=True)
        model_dir = out / "models" / name
        model_dir.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(model_dir / "model.onnx"))
        inp = model.graph.input[0]
        x = np.random.default_rng(0).random([d.dim_value for d in inp.type.tensor_type.shape.dim], dtype=np.float32)
        reference = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {inp.name: x})[0]
        for label in targets:
            target, options = TARGETS[label]
            folder = out / "artifacts" / f"{name}-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            artifact = _compile(model_dir, target, options, folder)
            np.save(folder / "input.npy", x)
            np.save(folder / "reference.npy", reference)
            arch = json.loads(subprocess.run(["tar", "-xOzf", str(artifact), "manifest.json"], capture_output=True,
                                             check=True).stdout)["target"]["cuda_arch"]
            entries.append({"name": name, "target": label, "cuda_arch": arch,
                            "artifact": str(artifact.relative_to(out)), "input": inp.name,
                            "input_file": str((folder / "input.npy").relative_to(out)),
                            "reference_file": str((folder / "reference.npy").relative_to(out)),
                            "rtol": RTOL, "atol": ATOL_OF_RANGE * float(np.abs(reference).max())})
            print(f"compiled {name} for {label} ({arch})", flush=True)
    shutil.rmtree(out / "models")
    return entries


def bundle(out: Path, models: tuple[str, ...] = MODELS, targets: tuple[str, ...] = tuple(TARGETS),
           pythons: tuple[str, ...] = PYTHONS) -> Path:
    """Build the whole bundle in ``out`` (replacing an older one)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wheels(out / "wheels", pythons)
    entries = artifacts(out, models, targets)
    (out / "bundle.json").write_text(json.dumps({"format_version": 1, "artifacts": entries}, indent=2))
    for script in ("gpu-check", "gpu_check.py"):
        shutil.copy2(REPO / "scripts" / script, out / script)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu-check")
    parser.add_argument("--model", action="append", choices=MODELS, help="default: all")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    parser.add_argument("--python", action="append", help=f"wheels for these Python versions (default {PYTHONS})")
    args = parser.parse_args(argv)
    out = bundle(args.out, tuple(args.model or MODELS), tuple(args.target or TARGETS), tuple(args.python or PYTHONS))
    print(f"gpu-check bundle in {out}: copy it to the GPU machine and run {out.name}/gpu-check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
