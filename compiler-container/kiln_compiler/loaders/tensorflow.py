"""TensorFlow models (SavedModel directory, or a frozen GraphDef ``.pb``) via tf2onnx into the ONNX path.

DataInputConfig for TENSORFLOW is NHWC, the model's own layout (SageMaker reference), so shapes pass
through as given; names may be written with or without the ``:0`` tensor suffix. The helpers here
are shared with the KERAS loader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kiln.runtime import TensorSpec

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files, resolve_shapes

log = logging.getLogger(__name__)

_HINT = ("Upload a SavedModel directory (tf.saved_model.save / model.export) or a frozen graph .pb "
         "(convert_variables_to_constants_v2) in the archive.")
# Graph nodes that are never model outputs when the outputs are inferred from a frozen graph.
_NOT_OUTPUTS = frozenset({"Const", "NoOp", "Placeholder", "PlaceholderWithDefault", "Assert", "SaveV2", "RestoreV2"})


def first_line(exc: BaseException) -> str:
    """The most informative line of an exception message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def match_names(config: DataInputConfig, names: Sequence[str]) -> DataInputConfig:
    """DataInputConfig with its names mapped onto the model's (``input`` and ``input:0`` name the same tensor)."""
    def canon(n: str) -> str:
        return n[:-2] if n.endswith(":0") else n

    by_canon = {canon(n): n for n in names}
    mapped = {by_canon.get(canon(k), k): v for k, v in config.by_name.items()}
    return replace(config, by_name=mapped)


def tf_dtype(dtype: Any) -> str:
    """A TensorFlow dtype as a numpy dtype name; ClientError for inputs the compiler cannot take."""
    name = str(getattr(dtype, "name", dtype))
    if name in ("string", "resource", "variant"):
        raise ClientError(f"the model has a {name} input, which the compiler cannot take; only numeric tensor "
                          "inputs can be compiled")
    return name


def to_onnx(convert: Callable[[], Any], framework: str) -> Any:
    """Run a tf2onnx conversion; its failure is a ClientError (the model uses something it cannot convert)."""
    try:
        proto, _ = convert()
    except ClientError:
        raise
    except Exception as exc:
        log.exception("tf2onnx conversion failed")
        raise ClientError(f"the {framework} model could not be converted to ONNX by tf2onnx: {first_line(exc)}"
                          ) from None
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ClientError(f"tf2onnx produced an invalid ONNX model for this {framework} model: "
                          f"{first_line(exc)}") from None
    return proto


def versions() -> str:
    import tensorflow as tf
    import tf2onnx

    return f"tensorflow {tf.__version__}, via tf2onnx {tf2onnx.__version__}"


def _from_saved_model(saved: Path, config: DataInputConfig, options: CompilerOptions,
                      model_dir: Path) -> LoadedModel:
    import tensorflow as tf
    import tf2onnx

    from .onnx import from_proto

    key = options.signature_def_key or "serving_default"
    try:
        loaded = tf.saved_model.load(str(saved))
    except Exception as exc:
        log.exception("tf.saved_model.load failed")
        raise ClientError(f"the SavedModel in '{saved.relative_to(model_dir) or '.'}' could not be loaded "
                          f"({first_line(exc)}). {_HINT}") from None
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if key not in signatures:
        raise ClientError(f"the SavedModel has no signature '{key}' (it has {sorted(signatures)}); set "
                          "CompilerOptions {\"signature_def_key\": ...} to one of them")
    signature = signatures[key]
    _, kwargs = signature.structured_input_signature
    declared = [(name, tuple(spec.shape.as_list()), tf_dtype(spec.dtype)) for name, spec in sorted(kwargs.items())]
    specs = resolve_shapes(declared, match_names(config, [n for n, _, _ in declared]), "TENSORFLOW",
                           layout="NHWC")
    names = [s.name for s in specs]
    input_signature = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in specs]

    @tf.function
    def call(*args: Any) -> Any:
        return signature(**dict(zip(names, args, strict=True)))

    proto = to_onnx(lambda: tf2onnx.convert.from_function(call, input_signature=input_signature), "TENSORFLOW")
    rel = saved.relative_to(model_dir)
    return from_proto(proto, DataInputConfig(), framework="TENSORFLOW", framework_version=versions(),
                      model_files=[str(rel / "saved_model.pb")], layout="NHWC")


def _graph_io(graph_def: Any, options: CompilerOptions) -> tuple[list[Any], list[str]]:
    nodes = list(graph_def.node)
    if any(n.op in ("VariableV2", "VarHandleOp", "Variable") for n in nodes):
        raise ClientError("the .pb graph still holds variables: freeze it (convert_variables_to_constants_v2) or "
                          "upload the SavedModel directory instead")
    placeholders = [n for n in nodes if n.op == "Placeholder"]
    if options.output_names:
        outputs = [n if ":" in n else f"{n}:0" for n in options.output_names]
        known = {n.name for n in nodes}
        missing = [o for o in outputs if o.rsplit(":", 1)[0] not in known]
        if missing:
            raise ClientError(f"CompilerOptions output_names {missing} are not nodes of the graph")
        return placeholders, outputs
    consumed = {i.lstrip("^").split(":")[0] for n in nodes for i in n.input}
    outputs = [f"{n.name}:0" for n in nodes if n.name not in consumed and n.op not in _NOT_OUTPUTS]
    if not outputs:
        raise ClientError("could not find the graph's outputs; name them in CompilerOptions "
                          "{\"output_names\": [\"...\"]}")
    return placeholders, outputs


def _from_frozen_graph(path: Path, config: DataInputConfig, options: CompilerOptions, model_dir: Path) -> LoadedModel:
    import tensorflow as tf
    import tf2onnx

    from .onnx import from_proto

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise ClientError(f"'{path.name}' is not a TensorFlow GraphDef ({first_line(exc)}). {_HINT}") from None
    placeholders, outputs = _graph_io(graph_def, options)
    declared = []
    for node in placeholders:
        shape_attr = node.attr["shape"].shape
        shape = None if shape_attr.unknown_rank else tuple(d.size if d.size >= 0 else None for d in shape_attr.dim)
        if shape is None:
            given = match_names(config, [node.name]).by_name.get(node.name)
            if given is None:
                raise ClientError(f"input '{node.name}' has an unknown rank; give its shape (NHWC) in DataInputConfig")
            shape = tuple(None for _ in given)
        declared.append((node.name, shape, tf_dtype(tf.dtypes.as_dtype(node.attr["dtype"].type))))
    specs: list[TensorSpec] = resolve_shapes(declared, match_names(config, [n for n, _, _ in declared]),
                                             "TENSORFLOW", layout="NHWC")
    proto = to_onnx(lambda: tf2onnx.convert.from_graph_def(
        graph_def, input_names=[f"{s.name}:0" for s in specs], output_names=outputs,
        shape_override={f"{s.name}:0": list(s.shape) for s in specs}), "TENSORFLOW")
    return from_proto(proto, DataInputConfig(), framework="TENSORFLOW", framework_version=versions(),
                      model_files=[str(path.relative_to(model_dir))], layout="NHWC")


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load a SavedModel (preferred when present) or a single frozen ``.pb`` graph."""
    files = find_model_files(model_dir, (".pb",), "TENSORFLOW", _HINT)
    saved = [f.parent for f in files if f.name == "saved_model.pb"]
    if len(saved) > 1:
        raise ClientError(f"the archive contains several SavedModels {[str(s.relative_to(model_dir)) for s in saved]}"
                          "; include exactly one")
    if saved:
        return _from_saved_model(saved[0], config, options, model_dir)
    if len(files) > 1:
        raise ClientError(f"the archive contains several .pb files {[f.name for f in files]}; include one frozen "
                          "graph or one SavedModel")
    return _from_frozen_graph(files[0], config, options, model_dir)
