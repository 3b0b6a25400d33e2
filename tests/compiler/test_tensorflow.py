"""TENSORFLOW (SavedModel, frozen graph) and KERAS (.keras, .h5) models via tf2onnx, the TVM build and the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kiln.runtime
import numpy as np
import pytest
from kiln.catalog import TargetCatalog
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import compile_artifact

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

CATALOG = TargetCatalog()
NHWC, NCHW = (1, 32, 32, 3), (1, 3, 32, 32)
RTOL, ATOL = 1e-4, 1e-6  # float32 rounding: TVM and TensorFlow sum in different orders


@pytest.fixture(scope="module")
def keras_model() -> Any:
    """Conv, batch norm (non-trivial statistics), depthwise conv, pooling, dense softmax; NHWC input 'image'."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input(NHWC[1:], name="image")
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    bn = layers.BatchNormalization()
    x = bn(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
    x = layers.GlobalAveragePooling2D()(layers.MaxPooling2D(2)(x))
    model = keras.Model(inp, layers.Dense(10, activation="softmax", name="probs")(x))
    rng = np.random.default_rng(1)
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, rng.uniform(-0.5, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


@pytest.fixture(scope="module")
def saved(keras_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model saved four ways, each in its own unpacked-archive directory."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    dirs = {k: tmp_path_factory.mktemp(k) for k in ("keras", "h5", "savedmodel", "frozen")}
    keras_model.save(str(dirs["keras"] / "model.keras"))
    keras_model.save(str(dirs["h5"] / "model.h5"))
    keras_model.export(str(dirs["savedmodel"] / "export" / "1"), verbose=False)
    func = tf.function(lambda x: keras_model(x, training=False)).get_concrete_function(
        tf.TensorSpec(NHWC, tf.float32, name="image"))
    graph = convert_variables_to_constants_v2(func).graph.as_graph_def()
    (dirs["frozen"] / "model.pb").write_bytes(graph.SerializeToString())
    return dirs


def _compile(framework: str, model_dir: Path, config: str | None, out: Path) -> kiln.runtime.Model:
    return kiln.runtime.load(compile_artifact(model_dir, framework, "ml_c4", out, data_input_config=config))


@pytest.mark.parametrize(("framework", "fmt", "config", "layout"), [
    ("KERAS", "keras", '{"image": [1, 3, 32, 32]}', NCHW),
    ("KERAS", "h5", '{"image": [1, 3, 32, 32]}', NCHW),
    ("TENSORFLOW", "savedmodel", '{"image": [1, 32, 32, 3]}', NHWC),
    ("TENSORFLOW", "frozen", '{"image": [1, 32, 32, 3]}', NHWC),
])
def test_ml_c4_artifact_matches_keras(framework: str, fmt: str, config: str, layout: tuple[int, ...],
                                      saved: dict[str, Path], keras_model: Any, tmp_path: Path) -> None:
    # GIVEN the model saved as .keras, .h5, a SavedModel or a frozen graph, with DataInputConfig in the
    # framework's layout (KERAS: NCHW although the model is NHWC; TENSORFLOW: NHWC)
    x = np.random.default_rng(2).standard_normal(NHWC).astype(np.float32)
    # WHEN it is compiled for ml_c4 and run through kiln.runtime with input in that layout
    model = _compile(framework, saved[fmt], config, tmp_path)
    feed = x.transpose(0, 3, 1, 2) if layout == NCHW else x
    (y,) = model.run({model.inputs[0].name: feed})
    # THEN it agrees with Keras on the NHWC data, and the artifact's input has the configured layout
    ref = keras_model(x, training=False).numpy()
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    assert y.argmax() == ref.argmax()
    assert model.inputs[0].shape == layout and model.outputs[0].shape == (1, 10)
    assert model.manifest["framework"] == framework and "tf2onnx" in model.manifest["framework_version"]


def test_keras_config_in_nhwc_is_refused(saved: dict[str, Path]) -> None:
    # GIVEN a Keras model, whose DataInputConfig must be NCHW
    # WHEN the shape is given in NHWC
    # THEN the error says which layout KERAS expects
    with pytest.raises(ClientError, match="NCHW in DataInputConfig"):
        load_model("KERAS", saved["keras"], DataInputConfig.parse('{"image": [1, 32, 32, 3]}', "KERAS"),
                   CompilerOptions())


def test_keras_batch_needs_data_input_config(saved: dict[str, Path]) -> None:
    # GIVEN a Keras model with a dynamic batch dimension
    # WHEN it is loaded without DataInputConfig
    # THEN the user is asked for the shape
    with pytest.raises(ClientError, match="dynamic shape"):
        load_model("KERAS", saved["keras"], DataInputConfig(), CompilerOptions())


def test_keras_lambda_layer_is_not_deserialised(tmp_path: Path) -> None:
    # GIVEN a .keras model with a Python lambda layer (arbitrary code when deserialised)
    inp = keras.Input((4,), name="v")
    model = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2.0)(inp))
    model.save(str(tmp_path / "model.keras"))
    # WHEN it is loaded
    # THEN Keras' safe mode refuses it and the user gets a ClientError
    with pytest.raises(ClientError, match=r"safe mode .*deserialization of a `Lambda` layer"):
        load_model("KERAS", tmp_path, DataInputConfig.parse('{"v": [1, 4]}', "KERAS"), CompilerOptions())


def test_savedmodel_signature_must_exist(saved: dict[str, Path]) -> None:
    # GIVEN a SavedModel with the default serving signature
    # WHEN CompilerOptions name a signature it does not have
    # THEN the error lists the signatures it has
    with pytest.raises(ClientError, match=r"has no signature 'predict'.*serving_default"):
        load_model("TENSORFLOW", saved["savedmodel"], DataInputConfig(),
                   CompilerOptions.parse('{"signature_def_key": "predict"}'))
