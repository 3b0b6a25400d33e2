"""aarch64 artifacts executed, not inspected: compiled here for Graviton2 (ml_c6g), Graviton3 (ml_c7g)
and run under qemu-user by the aarch64 kiln-runtime wheel (`kiln run --emulate`), compared with ONNX
Runtime / torch / the TFLite interpreter on this x86 host. Numerics only, never speed.

ml_c7g is not a SageMaker TargetDevice: it is compiled as TargetPlatform LINUX/ARM64 with Graviton3's
mcpu (neoverse-v1, SVE). rasp3b (armv7) artifacts cannot be executed: apache-tvm publishes no armv7
TVM runtime library (checked below: the refusal says so).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln import emulate
from kiln_compiler.samples import load_light_model

from tests.compiler.test_pytorch import SHAPE as TORCH_SHAPE
from tests.compiler.test_pytorch import saved, tiny_resnet  # noqa: F401 - fixtures
from tests.compiler.test_tflite import SHAPE as TFLITE_SHAPE
from tests.compiler.test_tflite import _input_for, _interpreter, tflite_dirs  # noqa: F401 - fixtures
from tests.runtime.conftest import compile_artifact

# Graviton2 as a TargetDevice; Graviton3 as the TargetPlatform a user asks for it with.
TARGETS = {"ml_c6g": ("ml_c6g", None), "ml_c7g": ("LINUX:ARM64", '{"mcpu": "neoverse-v1"}')}
# TVM and the reference sum in different orders (and fuse multiply-adds): float32 rounding only.
RTOL = 1e-4


@pytest.fixture(scope="module")
def aarch64() -> emulate.Emulator:
    """qemu-aarch64 and the aarch64 root `make install` builds (scripts/kiln_assets.py emulation-root)."""
    try:
        return emulate.emulator("aarch64")
    except emulate.EmulationError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def resnet50_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-50 (onnx's light model, random weights) without its final softmax: logits, which vary with the input."""
    d = tmp_path_factory.mktemp("resnet50")
    onnx.save(load_light_model("resnet50", 0, strip_softmax=True), str(d / "model.onnx"))
    return d


def _report(target: str, model: str, error: float, unit: str = "") -> None:
    print(f"\nEMULATED {target} {model}: max abs error {error:.3g}{unit}")


def _compare_onnx(model_dir: Path, device: str, tmp_path: Path, aarch64: emulate.Emulator, seed: int) -> None:
    target, options = TARGETS[device]
    artifact = compile_artifact(model_dir, "ONNX", target, tmp_path, options=options)
    model = onnx.load(str(model_dir / "model.onnx"))
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    ref = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {inp.name: x})[0]
    # WHEN the artifact runs on the emulated CPU
    (y,) = emulate.run(artifact, {inp.name: x})
    # THEN it agrees with ONNX Runtime within float32 rounding, on an output that varies
    error = float(np.abs(y.reshape(ref.shape) - ref).max())
    _report(device, model_dir.name.rstrip("0123456789").removesuffix("_dir"), error)
    assert np.ptp(ref) > 0.1 * np.abs(ref).max() > 0
    np.testing.assert_allclose(y.reshape(ref.shape), ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))
    assert y.argmax() == ref.argmax()


@pytest.mark.parametrize("device", ["ml_c6g", pytest.param("ml_c7g", marks=pytest.mark.slow)])
def test_squeezenet_emulated_matches_onnxruntime(device: str, squeezenet_dir: Path, tmp_path: Path,
                                                 aarch64: emulate.Emulator) -> None:
    # GIVEN SqueezeNet compiled for a Graviton target
    _compare_onnx(squeezenet_dir, device, tmp_path, aarch64, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["ml_c6g", "ml_c7g"])
def test_resnet50_emulated_matches_onnxruntime(device: str, resnet50_dir: Path, tmp_path: Path,
                                               aarch64: emulate.Emulator) -> None:
    # GIVEN ResNet-50 compiled for a Graviton target
    _compare_onnx(resnet50_dir, device, tmp_path, aarch64, seed=12)


@pytest.mark.parametrize("device", ["ml_c6g", pytest.param("ml_c7g", marks=pytest.mark.slow)])
def test_pytorch_emulated_matches_torch(device: str, saved: dict[str, Path], tiny_resnet: Any,  # noqa: F811
                                        tmp_path: Path, aarch64: emulate.Emulator) -> None:
    import torch

    # GIVEN a small ResNet exported with torch.export, compiled for a Graviton target
    target, options = TARGETS[device]
    artifact = compile_artifact(saved["export"], "PYTORCH", target, tmp_path, options=options)
    x = np.random.default_rng(13).standard_normal(TORCH_SHAPE).astype(np.float32)
    # WHEN it runs emulated
    (y,) = emulate.run(artifact, {"x": x})
    # THEN it agrees with torch on x86
    with torch.no_grad():
        ref = tiny_resnet(torch.from_numpy(x)).numpy()
    _report(device, "pytorch-tiny-resnet", float(np.abs(y - ref).max()))
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=1e-6)
    assert np.ptp(ref) > 0.01


@pytest.mark.parametrize("device", [pytest.param("ml_c6g", marks=pytest.mark.slow), "ml_c7g"])
def test_tflite_int8_emulated_matches_interpreter(device: str, tflite_dirs: dict[str, Path],  # noqa: F811
                                                  tmp_path: Path, aarch64: emulate.Emulator) -> None:
    # GIVEN a fully int8-quantized TFLite model compiled for a Graviton target
    interpreter = _interpreter(tflite_dirs["int8"] / "model.tflite")
    detail = interpreter.get_input_details()[0]
    x = _input_for(interpreter, seed=14)
    target, options = TARGETS[device]
    artifact = compile_artifact(tflite_dirs["int8"], "TFLITE", target, tmp_path, options=options,
                                data_input_config=f'{{"{detail["name"]}": {list(TFLITE_SHAPE)}}}')
    # WHEN it runs emulated, and TFLite's interpreter runs the same file on x86
    (y,) = emulate.run(artifact, {detail["name"]: x})
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    ref = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    # THEN the int8 outputs differ by at most one quantisation step (requantisation rounding)
    steps = int(np.abs(y.astype(np.int32) - ref.astype(np.int32)).max())
    _report(device, "tflite-int8", steps, " quantisation steps")
    assert y.dtype == ref.dtype == np.int8 and steps <= 1
    assert np.ptp(ref.astype(np.int32)) > 10


def test_kiln_run_emulate_command(squeezenet_dir: Path, tmp_path: Path, aarch64: emulate.Emulator) -> None:
    # GIVEN the tiny network compiled for ml_c6g and an input file
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    from tests.conftest import tiny_onnx_model

    onnx.save(tiny_onnx_model(), str(tiny / "model.onnx"))
    artifact = compile_artifact(tiny, "ONNX", "ml_c6g", tmp_path)
    x = np.random.default_rng(15).standard_normal((1, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    kiln = [sys.executable, "-m", "kiln.cli", "run"]
    # WHEN `kiln run --emulate` runs it, and plain `kiln run` is asked to
    run = subprocess.run([*kiln, "--emulate", str(artifact), "--input", f"x={tmp_path / 'x.npy'}",
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         check=False)
    native = subprocess.run([*kiln, str(artifact), "--input", f"x={tmp_path / 'x.npy'}"], capture_output=True,
                            text=True, timeout=300, check=False)
    bad = subprocess.run([*kiln, "--emulate", str(artifact), "--input", f"y={tmp_path / 'x.npy'}"],
                         capture_output=True, text=True, timeout=300, check=False)
    # THEN the emulated output is ONNX Runtime's; natively it is refused naming the machine; a wrong input is named
    assert run.returncode == 0, run.stderr
    ref = ort.InferenceSession(str(tiny / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out/output_0.npy"), ref, rtol=1e-5, atol=1e-6)
    assert native.returncode == 2 and "needs a aarch64 machine; this host is x86_64" in native.stderr
    assert bad.returncode == 2 and "unknown input(s) ['y']" in bad.stderr and "Traceback" not in bad.stderr


def test_armv7_artifacts_are_refused_clearly(squeezenet_dir: Path, tmp_path: Path) -> None:
    # GIVEN SqueezeNet compiled for rasp3b (armv7 hard-float)
    artifact = compile_artifact(squeezenet_dir, "ONNX", "rasp3b", tmp_path)
    x = np.zeros((1, 3, 224, 224), np.float32)
    # WHEN it is run emulated
    # THEN the error says why it cannot be: no armv7 TVM runtime library exists
    with pytest.raises(emulate.EmulationError, match=r"no emulation root for armv7l.*no armv7 TVM runtime library"):
        emulate.run(artifact, {"data_0": x})


def test_native_artifacts_are_not_emulated(tmp_path: Path) -> None:
    # GIVEN an x86_64 artifact
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    from tests.conftest import tiny_onnx_model

    onnx.save(tiny_onnx_model(), str(tiny / "model.onnx"))
    artifact = compile_artifact(tiny, "ONNX", "ml_c4", tmp_path)
    # WHEN asked to emulate it
    # THEN it is refused: it runs natively
    with pytest.raises(emulate.EmulationError, match="runs natively here"):
        emulate.run(artifact, {"x": np.zeros((1, 8), np.float32)})
