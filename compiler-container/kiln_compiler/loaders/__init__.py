"""Framework loaders: one module per framework, imported only when its framework is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln import rules
from kiln.runtime import TensorSpec

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig

__all__ = ["LoadedModel", "TensorSpec", "available_frameworks", "find_model_files", "get_loader", "load_model"]


@dataclass
class LoadedModel:
    """What a loader hands to the build step."""

    framework: str
    framework_version: str
    kind: Literal["relax", "tree", "coreml"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    model_files: list[str]
    mod: Any = None  # tvm.IRModule (relax) for kind == "relax"
    params: dict[str, Any] | None = None  # separate weights, when the frontend keeps them apart
    tree_model: Any = None  # treelite.Model for kind == "tree"; kind == "coreml" is converted, not built
    extra: dict[str, Any] = field(default_factory=dict)


Loader = Callable[[Path, DataInputConfig, CompilerOptions], LoadedModel]

# Framework -> module exposing ``load(model_dir, data_input_config, options) -> LoadedModel``.
_REGISTRY: dict[str, str] = {
    "ONNX": "kiln_compiler.loaders.onnx",
    "XGBOOST": "kiln_compiler.loaders.xgboost",
    "SKLEARN": "kiln_compiler.loaders.sklearn",
    "PYTORCH": "kiln_compiler.loaders.pytorch",
    "TFLITE": "kiln_compiler.loaders.tflite",
    "TENSORFLOW": "kiln_compiler.loaders.tensorflow",
    "KERAS": "kiln_compiler.loaders.keras",
    "DARKNET": "kiln_compiler.loaders.darknet",
    "MXNET": "kiln_compiler.loaders.mxnet",
}


def available_frameworks() -> list[str]:
    """Frameworks this compiler image can load."""
    return sorted(_REGISTRY)


def get_loader(framework: str) -> Loader:
    """The loader for ``framework``; ClientError when this image has none."""
    module_name = _REGISTRY.get(framework.upper())
    if module_name is None:
        raise ClientError(
            f"Framework {framework} is not supported by this compiler; supported: {', '.join(available_frameworks())}"
        )
    module = importlib.import_module(module_name)
    loader: Loader = module.load
    return loader


def load_model(framework: str, model_dir: Path, data_input_config: DataInputConfig,
               options: CompilerOptions) -> LoadedModel:
    """Find and load the model for ``framework`` from the unpacked archive."""
    return get_loader(framework)(model_dir, data_input_config, options)


def find_model_files(model_dir: Path, suffixes: tuple[str, ...], framework: str,
                     hint: str) -> list[Path]:
    """Files under ``model_dir`` with one of ``suffixes`` (hidden files and macOS junk skipped)."""
    found = sorted(
        p for p in model_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
        and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(model_dir).parts)
    )
    if not found:
        present = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())[:10]
        raise ClientError(
            f"no {framework} model file found in the archive (looked for {', '.join(suffixes)}; "
            f"found {present or 'nothing'}). {hint}"
        )
    return found


def resolve_shapes(declared: Sequence[tuple[str, tuple[int | None, ...], str]], config: DataInputConfig,
                   framework: str, layout: str = "NCHW") -> list[TensorSpec]:
    """Combine the shapes a model carries with DataInputConfig; ClientError naming the input on mismatch.

    ``declared`` holds (name, shape with None for unknown dims, dtype) in model order.
    """
    names = [n for n, _, _ in declared]
    unknown = sorted(set(config.by_name) - set(names))
    if unknown:
        raise ClientError(
            f"DataInputConfig names input(s) {unknown} that the {framework} model does not have; "
            f"the model's inputs are {names}"
        )
    if config.by_position and len(config.by_position) != len(declared):
        raise ClientError(
            f"DataInputConfig lists {len(config.by_position)} shape(s) but the model has {len(declared)} "
            f"input(s) {names}"
        )
    specs = []
    for i, (name, shape, dtype) in enumerate(declared):
        given = config.by_name.get(name) or (config.by_position[i] if config.by_position else None)
        if given is None:
            if any(d is None for d in shape):
                raise ClientError(
                    f"input '{name}' has a dynamic shape {['?' if d is None else d for d in shape]}; "
                    f"give its shape in DataInputConfig, for example {{\"{name}\": "
                    f"{[1 if d is None else d for d in shape]}}}"
                )
            specs.append(TensorSpec(name, tuple(int(d) for d in shape if d is not None), dtype))
            continue
        if len(given) != len(shape) or any(d is not None and d != g for d, g in zip(shape, given, strict=True)):
            raise ClientError(
                f"DataInputConfig shape {list(given)} for input '{name}' does not match the model's shape "
                f"{['?' if d is None else d for d in shape]} ({layout} layout expected for {framework}); "
                "fix DataInputConfig or omit it"
            )
        specs.append(TensorSpec(name, given, dtype))
    for spec in specs:  # shapes the model itself declares are capped like DataInputConfig's
        size = rules.input_bytes(spec.shape, spec.dtype)
        if size > rules.MAX_INPUT_BYTES:
            raise ClientError(f"the {framework} model's input '{spec.name}' has shape {list(spec.shape)}, {size} "
                              f"bytes as {spec.dtype}; an input may take at most {rules.MAX_INPUT_BYTES} bytes")
    return specs
