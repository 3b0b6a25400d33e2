"""The coreml target: real PyTorch / Keras / TensorFlow models converted by coremltools to an ML Program.

Core ML cannot run on Linux (coremltools' ``predict`` needs macOS), so numerics are checked by reading
the saved ``.mlpackage`` back (spec + weight blobs) and interpreting its MIL program with numpy
(``mil_numpy``), against the framework's own output. The program computes in float16, hence the tolerances.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import kiln.runtime
import numpy as np
import pytest
from kiln.catalog import TargetCatalog
from kiln_compiler import BuildResult, compile_model
from kiln_compiler.errors import ClientError
from kiln_compiler.options import CompilerOptions
from kiln_compiler.package import package

from tests.compiler import mil_numpy

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

TARGET = TargetCatalog().device("coreml")


def _to_coreml(framework: str, model_dir: Path, config: str | None, options: CompilerOptions,
               out_dir: Path) -> BuildResult:
    return compile_model(model_dir, framework, TARGET, options, out_dir=out_dir, data_input_config=config)
LABELS = ["cat", "dog", "bird", "fish"]
FP16 = {"rtol": 2e-2, "atol": 2e-3}  # float16 compute against float32 frameworks


def _spec(pkg: Path) -> Any:
    return ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()


def _ops(pkg: Path) -> list[Any]:
    return [op for op in mil_numpy.load_program(pkg).functions["main"].operations if op.op_type != "const"]


@pytest.fixture(scope="module")
def torch_classifier() -> Any:
    """Conv + batch norm (non-trivial statistics) + max pool + grouped strided conv + avg pool + linear + softmax."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, stride=2, groups=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, len(LABELS)), torch.nn.Softmax(-1))
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def torchscript_dir(torch_classifier: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("torchscript")
    torch.jit.trace(torch_classifier, torch.zeros(1, 3, 32, 32)).save(str(d / "model.pt"))
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return d


def test_torchscript_image_classifier_with_enumerated_shapes(torch_classifier: Any, torchscript_dir: Path,
                                                             tmp_path: Path) -> None:
    # GIVEN a TorchScript classifier, an Image input (list form, as PyTorch's DataInputConfig may be) with two
    # enumerated sizes, bias/scale mapping pixels to [-1, 1], and class_labels naming a file in the archive
    config = json.dumps([{"shape": [[1, 3, 32, 32], [1, 3, 64, 64]], "default_shape": [1, 3, 32, 32],
                          "type": "Image", "bias": [-1, -1, -1], "scale": 1 / 127.5}])
    options = CompilerOptions.parse('{"class_labels": "labels.txt"}', TARGET)
    # WHEN it is converted for coreml and packaged
    result = _to_coreml("PYTORCH", torchscript_dir, config, options, tmp_path / "build")
    artifact = package(result, TARGET, tmp_path / "model-coreml.tar.gz", model_dir=torchscript_dir,
                       labels_name="labels.txt")
    pkg = result.files[0]
    spec = _spec(pkg)
    # THEN the package is an ML Program whose input is an RGB image with exactly the enumerated sizes
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,) = spec.description.input
    assert inp.name == "input0" and inp.type.WhichOneof("Type") == "imageType"
    image = inp.type.imageType
    assert image.ColorSpace.Name(image.colorSpace) == "RGB" and (image.height, image.width) == (32, 32)
    assert [(s.height, s.width) for s in image.enumeratedSizes.sizes] == [(32, 32), (64, 64)]
    # AND the program starts with the image preprocessing: x * scale + bias
    ops = _ops(pkg)
    scale, bias = ops[0], ops[1]
    assert scale.op_type == "mul" and scale.inputs["x"].name == "input0"
    assert float(scale.inputs["y"].val) == pytest.approx(1 / 127.5)
    assert bias.op_type == "add" and bias.inputs["x"].name == scale.outputs[0].name
    np.testing.assert_allclose(np.ravel(bias.inputs["y"].val), [-1, -1, -1])
    # AND it is a classifier over the labels file's labels
    assert spec.description.predictedFeatureName == "classLabel"
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs"]
    classify = [op for op in ops if op.op_type == "classify"]
    assert len(classify) == 1 and list(classify[0].inputs["classes"].val) == LABELS
    # AND interpreting the stored program on 64x64 pixels gives torch's probabilities for the same image
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, 64, 64)).astype(np.float32)
    out = mil_numpy.run(mil_numpy.load_program(pkg), {"input0": pixels})
    with torch.no_grad():
        expected = torch_classifier(torch.from_numpy(pixels / 127.5 - 1)).numpy()[0]
    probs = out["classLabel_probs"]
    np.testing.assert_allclose([probs[label] for label in LABELS], expected, **FP16)
    assert out["classLabel"] == LABELS[int(np.argmax(expected))]
    # AND the artifact holds the whole .mlpackage and the labels, and its manifest says what it is
    with tarfile.open(artifact.path) as tar:
        names = tar.getnames()
    assert {"manifest.json", "class_labels.txt", "model.mlpackage/Manifest.json",
            "model.mlpackage/Data/com.apple.CoreML/model.mlmodel"} <= set(names)
    manifest = artifact.manifest
    assert manifest["runtime"] == "coreml" and manifest["library"] == "model.mlpackage"
    assert manifest["coreml"]["inputs"][0]["enumerated_sizes"] == [[32, 32], [64, 64]]
    assert manifest["coreml"]["classifier"]["labels"] == len(LABELS)
    assert manifest["inputs"] == [{"name": "input0", "shape": [1, 3, -1, -1], "dtype": "uint8"}]
    assert [o["name"] for o in manifest["outputs"]] == ["classLabel", "classLabel_probs"]
    # AND kiln.runtime refuses to run it here, saying where Core ML runs
    with pytest.raises(kiln.runtime.IncompatibleHostError, match="Core ML runs only on Apple devices"):
        kiln.runtime.load(artifact.path)


def test_exported_program_static_tensor_input(torch_classifier: Any, tmp_path: Path) -> None:
    # GIVEN the same network as a torch.export program (.pt2) and a static tensor shape
    d = tmp_path / "model"
    d.mkdir()
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    torch.export.save(torch.export.export(torch_classifier, (torch.from_numpy(x),)), str(d / "model.pt2"))
    # WHEN it is converted for coreml
    result = _to_coreml("PYTORCH", d, '{"x": {"shape": [1, 3, 32, 32]}}', CompilerOptions(), tmp_path / "build")
    model = result.model
    # THEN its input is a float32 tensor of exactly that shape (no flexibility) and its numerics match torch
    spec = _spec(result.files[0])
    (inp,) = spec.description.input
    array = inp.type.multiArrayType
    assert list(array.shape) == [1, 3, 32, 32] and array.WhichOneof("ShapeFlexibility") is None
    assert model.inputs[0].shape == (1, 3, 32, 32) and model.inputs[0].dtype == "float32"
    out = mil_numpy.run(mil_numpy.load_program(result.files[0]), {inp.name: x})
    with torch.no_grad():
        expected = torch_classifier(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out[spec.description.output[0].name], expected, **FP16)


@pytest.fixture(scope="module")
def keras_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    bn = layers.BatchNormalization()
    x = layers.MaxPooling2D(2)(bn(x))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(6, 3, strides=2, padding="same")(x))
    model = keras.Model(inp, layers.Dense(5, name="scores")(x))
    rng = np.random.default_rng(1)
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, rng.uniform(-0.5, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    d = tmp_path_factory.mktemp("keras")
    model.save(str(d / "model.keras"))
    return d, model


def test_keras_tensor_input_with_batch_range(keras_dir: tuple[Path, Any], tmp_path: Path) -> None:
    # GIVEN a Keras model (NHWC, as the reference's CoreML examples write Keras/TF shapes) and a batch range
    d, keras_model = keras_dir
    config = '{"image": {"shape": ["1..4", 16, 16, 3], "default_shape": [2, 16, 16, 3]}}'
    # WHEN it is converted for coreml
    result = _to_coreml("KERAS", d, config, CompilerOptions(), tmp_path / "build")
    model = result.model
    spec = _spec(result.files[0])
    # THEN the input is a tensor whose batch ranges over 1..4, default 2, the other dimensions fixed
    (inp,) = spec.description.input
    array = inp.type.multiArrayType
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "multiArrayType"
    assert list(array.shape) == [2, 16, 16, 3]
    assert [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges] == [(1, 4), (16, 16), (16, 16),
                                                                                 (3, 3)]
    assert model.inputs[0].shape == (-1, 16, 16, 3)
    # AND the stored program, run on a batch of 3, agrees with Keras
    x = np.random.default_rng(2).standard_normal((3, 16, 16, 3)).astype(np.float32)
    out = mil_numpy.run(mil_numpy.load_program(result.files[0]), {"image": x})
    (got,) = out.values()
    np.testing.assert_allclose(got, np.asarray(keras_model(x, training=False)), **FP16)


def test_tensorflow_savedmodel_grayscale_image(tmp_path: Path) -> None:
    # GIVEN a TensorFlow SavedModel on NHWC grayscale images, and an Image input with one bias value
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    kernel = tf.constant(rng.standard_normal((3, 3, 1, 4)).astype(np.float32))

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 12, 12, 1], tf.float32, name="pixels")])
        def serve(self, pixels: Any) -> Any:
            y = tf.nn.relu(tf.nn.conv2d(pixels, kernel, strides=1, padding="SAME"))
            return {"features": tf.reduce_mean(y, axis=[1, 2])}

    net = Net()
    d = tmp_path / "model"
    tf.saved_model.save(net, str(d / "saved"), signatures={"serving_default": net.serve})
    config = '{"pixels": {"shape": [1, 12, 12, 1], "type": "Image", "bias": [-0.5], "scale": 0.00392156862}}'
    # WHEN it is converted for coreml
    result = _to_coreml("TENSORFLOW", d, config, CompilerOptions(), tmp_path / "build")
    spec = _spec(result.files[0])
    # THEN the input is a 12x12 grayscale image and the program matches TensorFlow on the preprocessed pixels
    (inp,) = spec.description.input
    image = inp.type.imageType
    assert image.ColorSpace.Name(image.colorSpace) == "GRAYSCALE" and (image.height, image.width) == (12, 12)
    pixels = rng.integers(0, 256, (1, 12, 12, 1)).astype(np.float32)
    # (Core ML hands an image to the program as [1, C, H, W]; the converter transposes it back to NHWC)
    out = mil_numpy.run(mil_numpy.load_program(result.files[0]), {"pixels": pixels.transpose(0, 3, 1, 2)})
    expected = net.serve(tf.constant(pixels * 0.00392156862 - 0.5))["features"].numpy()
    np.testing.assert_allclose(out[spec.description.output[0].name], expected, **FP16)


@pytest.mark.parametrize(("config", "options", "message"), [
    ('[{"shape": [1, 3, 32, 32]}]', '{"class_labels": "three.txt"}', "could not convert"),
    ('[{"shape": [[1, 3, 32, 32], [1, 3, 64, 64]], "default_shape": [1, 3, 48, 48]}]', None,
     "is not one of the enumerated shapes"),
    ('[{"shape": [1, "4..2", 32, 32]}]', None, "range '4..2'"),
    ('[{"shape": [1, 4, 32, 32], "type": "Image"}]', None, "1 (grayscale) or 3 (RGB) channels"),
    (None, None, "needs DataInputConfig"),
])
def test_bad_coreml_configurations_are_client_errors(torchscript_dir: Path, tmp_path: Path, config: str | None,
                                                     options: str | None, message: str) -> None:
    # GIVEN the TorchScript classifier with a configuration that cannot work (3 labels for 4 classes, a default
    # shape outside the enumeration, an empty range, a 4-channel image, no shapes at all)
    (torchscript_dir / "three.txt").write_text("a\nb\nc\n")
    # WHEN it is converted for coreml
    # THEN the user is told what to fix
    with pytest.raises(ClientError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _to_coreml("PYTORCH", torchscript_dir, config, CompilerOptions.parse(options, TARGET), tmp_path / "build")


def test_coreml_job_completes_through_the_api(local_stack: Any, job_request: Any, upload_model: Any,
                                              torchscript_dir: Path, tmp_path: Path) -> None:
    from kiln.wiring import default_service

    from tests.conftest import tar_gz

    # GIVEN a TorchScript model and its labels uploaded as an archive, and a coreml job for it
    upload_model("coreml-job/model.tar.gz", tar_gz({
        "model.pt": (torchscript_dir / "model.pt").read_bytes(), "labels.txt": "\n".join(LABELS).encode()}))
    request = job_request("coreml-job")
    request["InputConfig"].update(Framework="PYTORCH", DataInputConfig=json.dumps(
        {"input0": {"shape": [1, 3, 32, 32], "type": "Image", "bias": [-1, -1, -1], "scale": 1 / 127.5}}))
    request["OutputConfig"].update(TargetDevice="coreml", CompilerOptions='{"class_labels": "labels.txt"}')
    # WHEN it runs through the API and the workflow
    default_service().create(request)
    job = local_stack.wait_for("coreml-job", timeout=300)
    # THEN it completes with {basename}-coreml.tar.gz holding the .mlpackage of an image classifier
    assert job["CompilationJobStatus"] == "COMPLETED", job.get("FailureReason")
    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert uri.endswith("/model-coreml.tar.gz")
    bucket, key = uri[len("s3://"):].split("/", 1)
    local = tmp_path / "artifact.tar.gz"
    local_stack.client("s3").download_file(bucket, key, str(local))
    with tarfile.open(local) as tar:
        tar.extractall(tmp_path / "artifact", filter="data")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["target"]["family"] == "coreml" and manifest["coreml"]["inputs"][0]["type"] == "Image"
    spec = _spec(tmp_path / "artifact" / "model.mlpackage")
    assert spec.description.predictedFeatureName == "classLabel"
    assert (tmp_path / "artifact" / "class_labels.txt").read_text().split() == LABELS


@pytest.mark.parametrize(("system", "refused"), [("Linux", True), ("Windows", True), ("Darwin", False)])
def test_runtime_host_check_accepts_coreml_only_on_apple(system: str, refused: bool) -> None:
    # GIVEN a coreml artifact's manifest (no machine or ISA: Core ML packages are machine-independent)
    manifest = {"target": {"name": "coreml", "family": "coreml", "machine": "", "isa": []},
                "library": "model.mlpackage"}
    # WHEN this host's operating system is checked
    # THEN only macOS is accepted, and the refusal says where Core ML runs
    if refused:
        with pytest.raises(kiln.runtime.IncompatibleHostError, match=f"Apple devices.*not on {system}"):
            kiln.runtime.check_host(manifest, system=system)
    else:
        kiln.runtime.check_host(manifest, system=system, machine="arm64")
