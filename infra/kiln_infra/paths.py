"""Where the files the CDK app packages live (all relative to the repository root)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS_DIR = REPO_ROOT / "functions"
STATE_MACHINE_FILE = REPO_ROOT / "statemachine" / "compilation_job.asl.json"
COMPILER_DOCKERFILE = "compiler-container/Dockerfile"
COMPILER_GPU_DOCKERFILE = "compiler-container/Dockerfile.gpu"
LAMBDA_REQUIREMENTS = REPO_ROOT / "infra" / "lambda-requirements.txt"
LAYER_BUILD_DIR = REPO_ROOT / "infra" / "build" / "lambda-layer"

# The compiler's docker build context is the repository root; only these paths go into it
# (a .dockerignore-style allow-list: everything else, e.g. .venv and .git, stays out).
COMPILER_CONTEXT_EXCLUDE = [
    "*",
    "!requirements/",
    "!requirements/**",
    "!functions/",
    "!functions/kiln/**",
    "!compiler-container/",
    "!compiler-container/**",
    # kiln-runtime and the script that makes the image's assets (tvm_ffi.dll, the aarch64 emulation root)
    "!runtime/",
    "!runtime/**",
    "runtime/kiln_runtime/lib",
    "**/*.egg-info",
    "!scripts/",
    "!scripts/kiln_assets.py",
    "**/__pycache__",
    "**/*.pyc",
]
