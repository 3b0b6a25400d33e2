"""Backends, registered like the loaders: TVM (neural networks), TL2cgen (tree ensembles), Core ML.

Each backend module exposes ``compile(request: CompileRequest) -> BuildResult`` and is imported
only when a job needs it (TVM, TL2cgen and coremltools are heavy).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kiln.catalog import TREE_FRAMEWORKS, Family, Target

from .base import LIB_NAMES, BuildResult, CompileRequest, first_line

__all__ = ["LIB_NAMES", "BuildResult", "CompileRequest", "backend_for", "first_line"]

_REGISTRY: dict[str, str] = {
    "tvm": "kiln_compiler.backends.tvm",
    "tl2cgen": "kiln_compiler.backends.tl2cgen",
    "coreml": "kiln_compiler.backends.coreml",
}

Backend = Callable[[CompileRequest], BuildResult]


def backend_name(target: Target, framework: str) -> str:
    """Which backend compiles ``framework`` models for ``target``."""
    if target.family is Family.COREML:
        return "coreml"
    if framework.upper() in TREE_FRAMEWORKS:
        return "tl2cgen"
    return "tvm"


def backend_for(target: Target, framework: str) -> Backend:
    """The backend's ``compile`` function (its module imported now)."""
    module = importlib.import_module(_REGISTRY[backend_name(target, framework)])
    compile_fn: Backend = module.compile
    return compile_fn
