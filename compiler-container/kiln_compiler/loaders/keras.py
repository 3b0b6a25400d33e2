"""Keras models (``.keras``, legacy ``.h5``) via tf2onnx into the ONNX path.

As in the SageMaker reference, the model is NHWC but DataInputConfig for KERAS is NCHW; 4-D
inputs are transposed at the artifact's entrance (tf2onnx ``inputs_as_nchw``), so the compiled
model takes the NCHW data the configuration describes. Models load with Keras' ``safe_mode``
(no Python lambdas deserialised); a ``.keras`` file (a zip) is first checked against the outer
archive's caps (:func:`kiln_compiler.archive.check_zip`), so a zip bomb is refused before Keras opens it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..archive import check_zip
from ..errors import ClientError
from ..options import CompilerOptions, DataInputConfig
from . import LoadedModel, find_model_files, resolve_shapes
from .tensorflow import match_names, tf_dtype, to_onnx, versions

log = logging.getLogger(__name__)

_HINT = "Save the model with model.save('model.keras') (or model.h5) and put that file in the archive."


def _nhwc(config: DataInputConfig) -> DataInputConfig:
    """The NCHW shapes of DataInputConfig in the model's NHWC layout (4-D shapes only)."""
    def swap(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else shape

    return replace(config, by_name={k: swap(v) for k, v in config.by_name.items()},
                   by_position=tuple(swap(s) for s in config.by_position))


def _load(path: Path) -> Any:
    import keras

    try:
        return keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        log.exception("keras load_model failed")
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise ClientError(f"'{path.name}' could not be loaded by Keras {keras.__version__} in safe mode "
                          f"({(lines[0] if lines else type(exc).__name__)[:300]}). {_HINT}") from None


def load(model_dir: Path, config: DataInputConfig, options: CompilerOptions) -> LoadedModel:
    """Load the single ``.keras`` / ``.h5`` file in ``model_dir``."""
    files = find_model_files(model_dir, (".keras", ".h5", ".hdf5"), "KERAS", _HINT)
    if len(files) > 1:
        raise ClientError(f"the archive contains several Keras models {[f.name for f in files]}; include one")
    path = files[0]
    if path.suffix.lower() == ".keras":
        check_zip(path)  # before TensorFlow is even imported

    import keras
    import tensorflow as tf
    import tf2onnx

    from .onnx import from_proto

    model = _load(path)
    names = [str(t.name).split(":")[0] for t in model.inputs]
    declared = [(n, tuple(t.shape), tf_dtype(t.dtype)) for n, t in zip(names, model.inputs, strict=True)]
    nhwc = resolve_shapes(declared, match_names(_nhwc(config), names), "KERAS",
                          layout="NCHW in DataInputConfig (the model itself NHWC)")
    input_signature = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in nhwc]
    output_names = [str(n) for n in getattr(model, "output_names", None) or []]

    @tf.function
    def call(*args: Any) -> Any:
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        flat = tf.nest.flatten(out)
        labels = output_names if len(output_names) == len(flat) else [f"output_{i}" for i in range(len(flat))]
        return dict(zip(labels, flat, strict=True))

    transposed = [f"{s.name}:0" for s in nhwc if len(s.shape) == 4]
    proto = to_onnx(lambda: tf2onnx.convert.from_function(call, input_signature=input_signature,
                                                          inputs_as_nchw=transposed), "KERAS")
    loaded = from_proto(proto, DataInputConfig(), framework="KERAS",
                        framework_version=f"keras {keras.__version__}, {versions()}",
                        model_files=[str(path.relative_to(model_dir))], layout="NCHW")
    return loaded
