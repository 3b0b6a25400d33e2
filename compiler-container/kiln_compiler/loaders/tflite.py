"""TensorFlow Lite flatbuffers (fp32 and fully integer-quantized) through TVM's Relax TFLite frontend.

Only the ``tflite`` flatbuffer parser is needed, not TensorFlow. Shapes are NHWC, as the
model stores them (the SageMaker reference: DataInputConfig for TFLITE is NHWC).
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files, resolve_shapes

log = logging.getLogger(__name__)

_HINT = "Convert the model with tf.lite.TFLiteConverter and put the .tflite file in the archive."
# tflite.TensorType values the compiler can take as model inputs.
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


def _parse(path: Path) -> Any:
    import tflite

    buf = path.read_bytes()
    # A flatbuffer's file identifier sits at bytes 4..8; TFLite's is "TFL3".
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ClientError(f"'{path.name}' is not a TensorFlow Lite flatbuffer (no TFL3 identifier). {_HINT}")
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("the model has no subgraph")
        model.Subgraphs(0).InputsAsNumpy()
    except ClientError:
        raise
    except Exception as exc:
        raise ClientError(f"'{path.name}' is not a valid TensorFlow Lite model ({str(exc)[:200]}). {_HINT}") from None
    return model


def _declared(model: Any) -> list[tuple[str, tuple[int | None, ...], str]]:
    subgraph = model.Subgraphs(0)
    declared = []
    for i in range(subgraph.InputsLength()):
        index = subgraph.Inputs(i)
        tensor = subgraph.Tensors(index)
        name = tensor.Name().decode() if tensor.Name() is not None else f"tvmgen_tensor_{index}"
        dtype = _TYPES.get(tensor.Type())
        if dtype is None:
            raise ClientError(f"the TFLite model's input '{name}' has tensor type {tensor.Type()}, which the compiler "
                              "cannot take as an input (supported: " + ", ".join(sorted(set(_TYPES.values()))) + ")")
        shape = [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
        signature = [int(d) for d in tensor.ShapeSignatureAsNumpy()] if tensor.ShapeSignatureLength() else shape
        declared.append((name, tuple(None if s < 0 else d for d, s in zip(shape, signature, strict=True)), dtype))
    return declared


def _output_names(model: Any) -> list[str]:
    subgraph = model.Subgraphs(0)
    names = []
    for i in range(subgraph.OutputsLength()):
        raw = subgraph.Tensors(subgraph.Outputs(i)).Name()
        names.append(raw.decode() if raw is not None else f"output_{i}")
    return names


def _version() -> str:
    try:
        return f"tflite {metadata.version('tflite')}"
    except metadata.PackageNotFoundError:
        return "tflite"


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load the single ``.tflite`` file in ``model_dir`` into a Relax IRModule."""
    files = find_model_files(model_dir, (".tflite",), "TFLITE", _HINT)
    if len(files) > 1:
        rel = [str(f.relative_to(model_dir)) for f in files]
        raise ClientError(f"the archive contains several .tflite files {rel}; include exactly one model")
    path = files[0]
    model = _parse(path)
    inputs = resolve_shapes(_declared(model), config, "TFLITE", layout="NHWC")

    from tvm.relax.frontend.tflite import from_tflite

    try:
        mod = from_tflite(model, shape_dict={s.name: tuple(s.shape) for s in inputs},
                          dtype_dict={s.name: s.dtype for s in inputs})
    except Exception as exc:
        log.exception("TFLite import failed")
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "not supported" in ln or "quantization" in ln),
                      lines[-1] if lines else type(exc).__name__)
        raise ClientError(f"the TFLite model could not be converted: {detail[:400]}") from None

    from .onnx import relax_outputs

    return LoadedModel(
        framework="TFLITE",
        framework_version=_version(),
        kind="relax",
        inputs=inputs,
        outputs=relax_outputs(mod, _output_names(model)),
        model_files=[str(path.relative_to(model_dir))],
        mod=mod,
        params=None,
    )
