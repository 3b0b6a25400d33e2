"""Sample models: the light ONNX architectures shipped with the onnx package, weights materialized.

Used by `make demo`, `make bench` and the tests (real architectures, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MODELS = {
    "resnet50": "light_resnet50",
    "densenet121": "light_densenet121",
    "inception_v1": "light_inception_v1",
    "squeezenet": "light_squeezenet",
    "shufflenet": "light_shufflenet",
}


def light_dir() -> Path:
    """Where the onnx package keeps its light models."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def load_light_model(name: str, seed: int = 0, strip_softmax: bool = False) -> onnx.ModelProto:
    """Load ``light_<name>`` and turn each ConstantOfShape weight into a random initializer.

    The shipped constants make every output identical whatever the input, which would hide
    wrong results: kernels (2-D and up) get He-normal values, vectors (biases, batch-norm
    parameters) U(0.9, 1.1): batch norms stay near identity, variances positive, logits input-dependent.
    ``strip_softmax`` drops a final Softmax so outputs are logits (softmax saturates on deep nets).
    """
    model = onnx.load(str(light_dir() / f"{MODELS.get(name, name)}.onnx"))
    rng = np.random.default_rng(seed)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    keep, new_inits = [], []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in inits[node.input[0]])
            if len(shape) >= 2:
                fan_in = int(np.prod(shape[1:]))
                arr = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
            else:
                arr = rng.uniform(0.9, 1.1, size=shape).astype(np.float32)
            new_inits.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    if strip_softmax and keep and keep[-1].op_type == "Softmax":
        last = keep.pop()
        keep[-1].output[0] = last.output[0]  # logits keep the graph output's name
    used = {i for n in keep for i in n.input}
    graph = model.graph
    del graph.node[:]
    graph.node.extend(keep)
    produced = {i.name for i in new_inits}
    old = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(old + new_inits)
    inputs = [i for i in graph.input if i.name not in produced and i.name not in inits and i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs
    onnx.checker.check_model(model)
    return model


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Graph inputs (not initializers) and their static shapes."""
    return {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input
    }


def quantize_qdq(model: onnx.ModelProto, work: Path, seed: int = 0, samples: int = 4,
                 images: np.ndarray | None = None) -> onnx.ModelProto:
    """``model`` quantized by onnxruntime's ``quantize_static`` as users do: QDQ format, per-channel s8
    weights, u8 activations, calibrated on ``samples`` random normal inputs (or on ``images``, the first
    input's samples stacked on its batch axis). Models below opset 13 are converted first (per-channel
    DequantizeLinear needs its ``axis``)."""
    return _quantize_static(model, work, "QDQ", seed, samples, images)


def quantize_qoperator(model: onnx.ModelProto, work: Path, seed: int = 0, samples: int = 4) -> onnx.ModelProto:
    """``model`` quantized as :func:`quantize_qdq` does, in QOperator format (QLinearConv, com.microsoft
    QLinearAdd, QLinearConcat, ...: one quantized operator per float operator)."""
    return _quantize_static(model, work, "QOperator", seed, samples)


def _quantize_static(model: onnx.ModelProto, work: Path, quant_format: str, seed: int,
                     samples: int, images: np.ndarray | None = None) -> onnx.ModelProto:
    import onnx.version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        model = onnx.version_converter.convert_version(model, 13)
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    if images is None:
        batches = iter([{inp.name: rng.standard_normal(shape).astype("float32")} for _ in range(samples)])
    else:
        batches = iter([{inp.name: images[i:i + 1]} for i in range(len(images))])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    work.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(work / "fp32.onnx"))
    out = work / f"{quant_format.lower()}.onnx"
    quantize_static(str(work / "fp32.onnx"), str(out), Reader(), quant_format=QuantFormat[quant_format],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(out))
