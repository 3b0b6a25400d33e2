"""ONNX models through TVM's Relax ONNX frontend."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.runtime import TensorSpec

from ..archive import DEFAULT_LIMITS, ArchiveLimits
from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files, resolve_shapes

log = logging.getLogger(__name__)
MAX_PROTO_BYTES = 2 * 1024**3  # protobuf's limit on one message: a larger .onnx keeps its weights outside


def _dtype(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def relax_outputs(mod: Any, names: list[str]) -> list[TensorSpec]:
    """Output specs from the Relax ``main`` function's return type."""
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs = []
    for i, f in enumerate(fields):
        shape = tuple(int(d) if hasattr(d, "value") or isinstance(d, int) else -1 for d in (f.shape or ()))
        specs.append(TensorSpec(names[i] if i < len(names) else f"output_{i}", shape, str(f.dtype)))
    return specs


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto a graph declares: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _external_file(tensor: Any, model_file: Path, model_dir: Path) -> tuple[Path, int, int]:
    """The file, offset and length of a tensor's external data; ClientError unless it is inside the archive."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    shown = f"tensor '{tensor.name}' keeps its data in '{location}'"
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in Path(location).parts:
        raise ClientError(f"{shown}, outside the model archive; external data must be a file in the archive, "
                          "named relative to the .onnx file (onnx.save(..., save_as_external_data=True))")
    target = model_file.parent / location
    try:
        target.resolve().relative_to(model_dir.resolve())
    except ValueError:
        raise ClientError(f"{shown}, which leads outside the model archive") from None
    if not target.is_file():
        raise ClientError(f"{shown}, which the archive does not contain")
    try:
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
    except ValueError:
        raise ClientError(f"{shown} with a malformed offset or length") from None
    size = target.stat().st_size
    if offset < 0 or offset > size or (length >= 0 and offset + length > size):
        raise ClientError(f"{shown} at bytes {offset}..{offset + length}, beyond the end of that file ({size} bytes)")
    return target, offset, length


def check_declared_tensors(model: Any, model_file: Path, model_dir: Path,
                           limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
    """Before any tensor data is read: every declared tensor's size (dims x element size) within the
    archive's per-file cap and their sum within its total cap, external data only inside the archive."""
    import onnx

    total = 0
    for tensor in _tensors(model.graph):
        dims = tuple(tensor.dims)
        if any(d < 0 for d in dims):
            raise ClientError(f"tensor '{tensor.name}' declares a negative dimension {list(dims)}")
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except Exception:
            raise ClientError(f"tensor '{tensor.name}' declares an unknown data type {tensor.data_type}") from None
        size = math.prod(dims) * itemsize
        if size > limits.max_member_bytes:
            raise ClientError(f"tensor '{tensor.name}' declares {math.prod(dims)} elements ({size} bytes), more than "
                              f"the {limits.max_member_bytes} bytes one tensor may take")
        total += size
        if total > limits.max_total_bytes:
            raise ClientError(f"the model's tensors declare more than {limits.max_total_bytes} bytes in all")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _external_file(tensor, model_file, model_dir)


def allow_initializers_outside_inputs(model: Any) -> None:
    """Read an IR version 3 model whose initializers are not all graph inputs as IR version 4.

    IR 3 wants every initializer listed among the graph inputs; onnxruntime's ``quantize_static`` adds its
    scales and zero points as initializers only and keeps the model's IR version, so its output fails the
    checker (ONNX Runtime runs it). IR 4 lifted exactly that rule and changed nothing else."""
    if model.ir_version < 4 and {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}:
        log.info("IR version %d model keeps initializers outside its inputs: read as IR version 4", model.ir_version)
        model.ir_version = 4


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load the single ``.onnx`` file in ``model_dir`` into a Relax IRModule.

    The graph is read without its external data first, so declared sizes and external locations are
    checked before any weight is read (:func:`check_declared_tensors`)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    files = find_model_files(model_dir, (".onnx",), "ONNX", "Put the model in the archive as model.onnx.")
    if len(files) > 1:
        rel = [str(f.relative_to(model_dir)) for f in files]
        raise ClientError(f"the archive contains several .onnx files {rel}; include exactly one model")
    path = files[0]
    if path.stat().st_size > MAX_PROTO_BYTES:  # protobuf cannot parse it; reading it would allocate it all
        raise ClientError(f"'{path.name}' is larger than 2 GiB; save the model with its weights as external data "
                          "(onnx.save(..., save_as_external_data=True))")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises many types for corrupt input
        raise ClientError(f"'{path.name}' is not a valid ONNX model ({str(exc).splitlines()[0][:300]})") from None
    check_declared_tensors(model, path, model_dir)
    allow_initializers_outside_inputs(model)
    try:
        load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises many types for corrupt input
        raise ClientError(f"'{path.name}' is not a valid ONNX model ({str(exc).splitlines()[0][:300]})") from None
    return from_proto(model, config, framework="ONNX", framework_version=f"onnx {onnx.__version__}",
                      model_files=[str(path.relative_to(model_dir))])


def from_proto(model: Any, config: DataInputConfig, *, framework: str, framework_version: str,
               model_files: list[str], layout: str = "NCHW") -> LoadedModel:
    """Import a checked ``onnx.ModelProto`` (also the end of the TENSORFLOW and KERAS paths, via tf2onnx)."""
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from .qoperator import prepare

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    model = prepare(model)  # QOperator nodes (QLinearConv, ...) as DequantizeLinear -> op -> QuantizeLinear
    supported = _get_convert_map()
    missing = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx", "com.microsoft")}
                     - set(supported))
    if missing:
        raise ClientError(
            f"the ONNX model uses operator(s) {missing} that the compiler does not support; "
            "re-export the model without them (or with a different opset)"
        )
    initializers = {i.name for i in model.graph.initializer}
    declared = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        declared.append((inp.name, shape, _dtype(tt.elem_type)))
    inputs = resolve_shapes(declared, config, framework, layout=layout)
    try:
        mod = from_onnx(
            model,
            shape_dict={s.name: list(s.shape) for s in inputs},
            dtype_dict={s.name: s.dtype for s in inputs},
            opset=opset or None,
            keep_params_in_input=False,
            sanitize_input_names=False,
        )
    except Exception as exc:
        log.exception("ONNX import failed")
        first = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise ClientError(f"the {framework} model could not be converted: {first}") from None
    outputs = relax_outputs(mod, [o.name for o in model.graph.output])
    return LoadedModel(
        framework=framework,
        framework_version=f"{framework_version}, opset {opset}",
        kind="relax",
        inputs=inputs,
        outputs=outputs,
        model_files=model_files,
        mod=mod,
        params=None,
        extra={"onnx_model": model},  # quantize-by-calibration starts from it (kiln_compiler.quantize)
    )
