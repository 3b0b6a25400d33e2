"""PyTorch models (torch.export .pt2 and TorchScript .pth) through the loader, the TVM build and the runtime."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import kiln.runtime
import numpy as np
import pytest
from kiln.catalog import TargetCatalog
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import compile_artifact

torch = pytest.importorskip("torch")
nn = torch.nn

CATALOG = TargetCatalog()
SHAPE = (1, 3, 32, 32)
# TVM and torch sum convolutions in different orders: float32 rounding, nothing more.
RTOL, ATOL = 1e-4, 1e-5


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn plus the identity, then relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem conv (stride 2), one basic block, global average pooling, a linear classifier, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.block = BasicBlock(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(self.pool(self.block(torch.relu(self.stem(x)))), 1)
        return torch.softmax(self.fc(features), dim=-1)


@pytest.fixture(scope="module")
def tiny_resnet() -> nn.Module:
    """TinyResNet in eval mode, random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def saved(tiny_resnet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model saved both ways, each in its own unpacked-archive directory."""
    example = (torch.zeros(SHAPE),)
    export_dir = tmp_path_factory.mktemp("pt2")
    torch.export.save(torch.export.export(tiny_resnet, example), str(export_dir / "model.pt2"))
    script_dir = tmp_path_factory.mktemp("torchscript")
    torch.jit.trace(tiny_resnet, example).save(str(script_dir / "model.pth"))
    return {"export": export_dir, "script": script_dir}


def _compile_and_run(model_dir: Path, config: str | None, out: Path, x: np.ndarray) -> tuple[kiln.runtime.Model,
                                                                                             np.ndarray]:
    model = kiln.runtime.load(compile_artifact(model_dir, "PYTORCH", "ml_c4", out, data_input_config=config))
    (y,) = model.run({model.inputs[0].name: x})
    return model, y


@pytest.mark.parametrize(("fmt", "config", "input_name"), [
    ("export", None, "x"),
    ("script", '{"input0": [1, 3, 32, 32]}', "input0"),
    ("script", "[[1, 3, 32, 32]]", "input0"),
])
def test_ml_c4_artifact_matches_torch(fmt: str, config: str | None, input_name: str, saved: dict[str, Path],
                                      tiny_resnet: nn.Module, tmp_path: Path) -> None:
    # GIVEN the model saved as an ExportedProgram or as TorchScript, with DataInputConfig in dict or list form
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    # WHEN it is compiled for ml_c4 and run through kiln.runtime
    model, y = _compile_and_run(saved[fmt], config, tmp_path, x)
    # THEN it agrees with torch within float32 rounding, and the manifest names the input and the format
    with torch.no_grad():
        ref = tiny_resnet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    assert y.argmax() == ref.argmax()
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [(input_name, SHAPE, "float32")]
    assert [(s.shape, s.dtype) for s in model.outputs] == [((1, 10), "float32")]
    assert model.manifest["framework"] == "PYTORCH"
    assert ("torch.export" if fmt == "export" else "TorchScript") in model.manifest["framework_version"]


def test_dynamic_export_takes_its_shape_from_data_input_config(tiny_resnet: nn.Module, tmp_path: Path) -> None:
    # GIVEN an ExportedProgram whose batch and spatial sizes are dynamic
    dims = {"x": {0: torch.export.Dim("batch", max=8), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    program = torch.export.export(tiny_resnet, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=dims)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    # WHEN it is loaded without DataInputConfig, and then with a fixed shape
    with pytest.raises(ClientError, match="dynamic shape"):
        load_model("PYTORCH", tmp_path, DataInputConfig(), CompilerOptions())
    x = np.random.default_rng(4).standard_normal((2, 3, 24, 24)).astype(np.float32)
    model, y = _compile_and_run(tmp_path, '{"x": [2, 3, 24, 24]}', tmp_path / "out", x)
    # THEN the shapes become static and the results match torch's for that shape
    with torch.no_grad():
        ref = tiny_resnet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    assert model.inputs[0].shape == (2, 3, 24, 24) and model.outputs[0].shape == (2, 10)


def test_torchscript_needs_shapes_that_fit(saved: dict[str, Path]) -> None:
    # GIVEN TorchScript, which carries no input shapes
    # WHEN it is loaded without DataInputConfig, or with a shape the model cannot take
    # THEN the user is told what to give
    with pytest.raises(ClientError, match="TorchScript models need DataInputConfig"):
        load_model("PYTORCH", saved["script"], DataInputConfig(), CompilerOptions())
    with pytest.raises(ClientError, match="could not be converted"):
        load_model("PYTORCH", saved["script"], DataInputConfig.parse("[[1, 5, 32, 32]]", "PYTORCH"),
                   CompilerOptions())


def test_wrong_shape_for_an_export_is_refused(saved: dict[str, Path]) -> None:
    # GIVEN a static ExportedProgram for [1, 3, 32, 32]
    # WHEN DataInputConfig asks for another shape
    # THEN the loader names the model's shape
    with pytest.raises(ClientError, match=r"does not match the exported program's shape \[1, 3, 32, 32\]"):
        load_model("PYTORCH", saved["export"], DataInputConfig.parse('{"x": [1, 3, 64, 64]}', "PYTORCH"),
                   CompilerOptions())


class _Payload:
    """Unpickling this writes a marker file (stands in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def test_pickles_are_never_unpickled(saved: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    # GIVEN a plain pickle named model.pth (a state_dict saved with torch.save of the whole model, say)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
    # AND a real .pt2 archive with an opaque pickled constant added to it
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    src = saved["export"] / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(hostile / "model.pt2", "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for item in zin.infolist():
            zout.writestr(item, zin.read(item.filename))
        zout.writestr(f"{root}/data/constants/opaque_obj_0", pickle.dumps(_Payload(marker)))
    # WHEN they are loaded
    # THEN both are refused as ClientErrors and the payload never ran
    with pytest.raises(ClientError, match="not a zip archive"):
        load_model("PYTORCH", plain, DataInputConfig.parse("[[1, 3, 32, 32]]", "PYTORCH"), CompilerOptions())
    with pytest.raises(ClientError, match="pickled Python objects"):
        load_model("PYTORCH", hostile, DataInputConfig(), CompilerOptions())
    assert not marker.exists()
