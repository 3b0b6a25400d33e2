"""TensorFlow Lite models (fp32 and int8/uint8 fully quantized) through the loader, the TVM build and the runtime.

The models are made here with TensorFlow's TFLiteConverter and checked against TFLite's own interpreter.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kiln.runtime
import numpy as np
import pytest
from kiln.catalog import TargetCatalog
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import EM_AARCH64, compile_artifact, disassemble, elf_header

tf = pytest.importorskip("tensorflow")

CATALOG = TargetCatalog()
SHAPE = (1, 32, 32, 3)  # NHWC, as TFLite stores it
FP32_RTOL, FP32_ATOL = 1e-4, 1e-5
# TVM's integer kernels and TFLite's reference kernels may round a requantisation differently:
# at most one step of the output's quantisation scale.
QUANT_STEPS = 1


def _keras_model() -> Any:
    """A small MobileNet-like network: conv, depthwise conv, 1x1 conv, a residual add, pooling, dense logits."""
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inp = tf.keras.Input(SHAPE[1:], batch_size=1, name="image")
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    y = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
    y = layers.Conv2D(8, 1)(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, layers.Dense(10)(x))


@pytest.fixture(scope="module")
def tflite_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model.tflite as fp32, int8 (int8 in/out) and uint8 (uint8 in/out), each in its own directory."""
    model = _keras_model()
    rng = np.random.default_rng(0)

    def calibration() -> Iterator[list[np.ndarray]]:
        for _ in range(32):
            yield [rng.standard_normal(SHAPE).astype(np.float32)]

    dirs = {}
    for kind, io_type in (("fp32", None), ("int8", tf.int8), ("uint8", tf.uint8)):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if io_type is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = calibration
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = converter.inference_output_type = io_type
        d = tmp_path_factory.mktemp(f"tflite-{kind}")
        (d / "model.tflite").write_bytes(converter.convert())
        dirs[kind] = d
    return dirs


def _integer_cnn() -> Any:
    """Three convolutions with 16 channels (3x3 stride 2 + relu, 3x3 + relu, 1x1), a residual add + relu, global
    average pool, dense: widths the VNNI kernels take (output channels multiple of 16, inputs of 4)."""
    tf.keras.utils.set_random_seed(1)
    layers = tf.keras.layers
    inp = tf.keras.Input(SHAPE[1:], batch_size=1, name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inp)
    y = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    y = layers.Conv2D(16, 1)(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, layers.Dense(10)(x))


@pytest.fixture(scope="module")
def tflite_int8_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``_integer_cnn`` as a full-integer TFLite model (int8 in/out, the converter's representative dataset)."""
    rng = np.random.default_rng(1)
    converter = tf.lite.TFLiteConverter.from_keras_model(_integer_cnn())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.standard_normal(SHAPE).astype(np.float32)] for _ in range(16))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    d = tmp_path_factory.mktemp("tflite-int8-cnn")
    (d / "model.tflite").write_bytes(converter.convert())
    return d


def _interpreter(path: Path) -> Any:
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _input_for(interpreter: Any, seed: int) -> np.ndarray:
    """Random float input, quantised with the model's own input parameters when the input is an integer."""
    detail = interpreter.get_input_details()[0]
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    if detail["dtype"] == np.float32:
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])


def _compile(model_dir: Path, target: str, out: Path, config: str | None = None) -> Path:
    return compile_artifact(model_dir, "TFLITE", target, out, data_input_config=config)


@pytest.mark.parametrize("kind", ["fp32", "int8", "uint8"])
def test_ml_c4_artifact_matches_tflite_interpreter(kind: str, tflite_dirs: dict[str, Path], tmp_path: Path) -> None:
    # GIVEN the model as fp32 or fully quantized TFLite, and TFLite's interpreter on the same file
    interpreter = _interpreter(tflite_dirs[kind] / "model.tflite")
    x = _input_for(interpreter, seed=5)
    # WHEN it is compiled for ml_c4 (with DataInputConfig in NHWC) and run through kiln.runtime
    name = interpreter.get_input_details()[0]["name"]
    model = kiln.runtime.load(_compile(tflite_dirs[kind], "ml_c4", tmp_path, f'{{"{name}": [1, 32, 32, 3]}}'))
    (y,) = model.run({name: x})
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    ref = interpreter.get_tensor(out["index"])
    # THEN the output has the interpreter's dtype and agrees with it (float rounding, or one quantisation step)
    assert y.dtype == ref.dtype and y.shape == ref.shape == (1, 10)
    assert model.inputs[0].dtype == str(x.dtype) and model.inputs[0].shape == SHAPE
    if kind == "fp32":
        np.testing.assert_allclose(y, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    else:
        assert np.abs(y.astype(np.int32) - ref.astype(np.int32)).max() <= QUANT_STEPS
        assert np.ptp(ref.astype(np.int32)) > 10 * QUANT_STEPS  # the comparison is not between constants
    assert y.argmax() == ref.argmax()
    assert model.manifest["framework"] == "TFLITE"


def test_quantized_model_for_arm_edge_board_is_aarch64(tflite_dirs: dict[str, Path], tmp_path: Path) -> None:
    # GIVEN the int8 model compiled for a Raspberry Pi 4 (64-bit OS)
    art = _compile(tflite_dirs["int8"], "rasp4b", tmp_path)
    # WHEN the artifact is unpacked
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    manifest = kiln.runtime.read_manifest(tmp_path / "x")
    # THEN the library is a 64-bit AArch64 shared object and the manifest keeps the int8 interface
    assert elf_header(tmp_path / "x/model.so")[:2] == (2, EM_AARCH64)
    assert manifest["inputs"][0]["dtype"] == "int8" and manifest["outputs"][0]["dtype"] == "int8"


def test_nchw_shape_for_tflite_is_refused(tflite_dirs: dict[str, Path]) -> None:
    # GIVEN an NHWC TFLite model
    name = _interpreter(tflite_dirs["fp32"] / "model.tflite").get_input_details()[0]["name"]
    # WHEN DataInputConfig gives the shape in NCHW
    # THEN the error says that TFLITE shapes are NHWC
    with pytest.raises(ClientError, match="NHWC layout expected for TFLITE"):
        load_model("TFLITE", tflite_dirs["fp32"], DataInputConfig.parse(f'{{"{name}": [1, 3, 32, 32]}}', "TFLITE"),
                   CompilerOptions())


def test_not_a_tflite_file(tmp_path: Path) -> None:
    # GIVEN a file named model.tflite that is not a flatbuffer
    (tmp_path / "model.tflite").write_bytes(b"PK\x03\x04 not a tflite model at all")
    # WHEN it is loaded
    # THEN it is a ClientError naming the file
    with pytest.raises(ClientError, match=r"'model\.tflite' is not a TensorFlow Lite flatbuffer"):
        load_model("TFLITE", tmp_path, DataInputConfig(), CompilerOptions())


def test_full_integer_convolutions_become_integer_kernels(tflite_int8_cnn_dir: Path) -> None:
    # GIVEN the full-integer TFLite CNN, which TVM's TFLite frontend imports as dequantize -> fp32 conv2d
    # (NHWC / HWIO) -> quantize, the fused relu as a clip of the quantized value
    from kiln_compiler.graph import QuantizedConvToInteger

    loaded = load_model("TFLITE", tflite_int8_cnn_dir, DataInputConfig(), CompilerOptions())
    # WHEN the integer rewrite runs
    rewrite = QuantizedConvToInteger()
    out = rewrite(loaded.mod)
    # THEN all three convolutions are u8 x s8 -> s32 (the s8 activations shifted by 128) and no clip is left
    assert rewrite.rewritten == 3
    ops = _call_ops(out)
    assert "relax.clip" not in ops
    assert ops.count("relax.nn.conv2d") == 3


def _call_ops(mod: Any) -> list[str]:
    from tvm import relax

    found: list[str] = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e.op.name) if isinstance(e, relax.Call)
                                    and hasattr(e.op, "name") else None)
    return found


def test_full_integer_model_runs_vpdpbusd_and_matches_tflite_interpreter(tflite_int8_cnn_dir: Path,
                                                                         tmp_path: Path) -> None:
    # GIVEN the full-integer TFLite CNN compiled for ml_c5 with a VNNI CPU (mcpu cascadelake)
    art = compile_artifact(tflite_int8_cnn_dir, "TFLITE", "ml_c5", tmp_path, options='{"mcpu": "cascadelake"}')
    with tarfile.open(art) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    # THEN its code multiplies with vpdpbusd (integer kernels, not fp32 on dequantized values)
    assert "vpdpbusd" in disassemble(tmp_path / "x/model.so")
    if "avx512_vnni" not in (kiln.runtime.cpu_flags() or set()):
        pytest.skip("the host has no AVX512-VNNI to run the artifact")
    # AND WHEN it and TFLite's interpreter run the same inputs: at most one quantisation step apart
    interpreter = _interpreter(tflite_int8_cnn_dir / "model.tflite")
    model = kiln.runtime.load(art)
    for seed in range(2):
        x = _input_for(interpreter, seed)
        (y,) = model.run({model.inputs[0].name: x})
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        ref = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        assert y.dtype == ref.dtype == np.int8
        assert np.abs(y.astype(np.int32) - ref.astype(np.int32)).max() <= QUANT_STEPS
        assert np.ptp(ref.astype(np.int32)) > 10 * QUANT_STEPS  # the comparison is not between constants
