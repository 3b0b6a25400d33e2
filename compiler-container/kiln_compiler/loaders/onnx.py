"""ONNX models through TVM's Relax ONNX frontend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kiln.runtime import TensorSpec

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files, resolve_shapes

log = logging.getLogger(__name__)


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


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load the single ``.onnx`` file in ``model_dir`` into a Relax IRModule."""
    import onnx

    files = find_model_files(model_dir, (".onnx",), "ONNX", "Put the model in the archive as model.onnx.")
    if len(files) > 1:
        rel = [str(f.relative_to(model_dir)) for f in files]
        raise ClientError(f"the archive contains several .onnx files {rel}; include exactly one model")
    path = files[0]
    try:
        model = onnx.load(str(path), load_external_data=True)
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

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    supported = _get_convert_map()
    missing = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} - set(supported))
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
    )
