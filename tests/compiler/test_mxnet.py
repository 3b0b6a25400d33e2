"""MXNet checkpoints (symbol + params) through the isolated MXNet environment, the ONNX path, the build and the runtime.

The network is built and run by mxnet itself in ``.venv-mxnet`` (Python 3.9, requirements/mxnet.txt; ``make install``
creates it), so the reference output is MXNet's own forward pass.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import kiln.runtime
import numpy as np
import pytest
from kiln.catalog import TargetCatalog
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import load_model
from kiln_compiler.loaders.mxnet import mxnet_python
from kiln_compiler.options import CompilerOptions, DataInputConfig

from tests.compiler.conftest import compile_artifact

CATALOG = TargetCatalog()
SHAPE = (1, 3, 16, 16)
# TVM and MXNet sum convolutions in different orders: float32 rounding, nothing more.
RTOL, ATOL = 1e-4, 1e-6

# Run by the MXNet interpreter: conv + batchnorm + relu + max pooling + fully connected + softmax, random weights and
# non-trivial batch-norm statistics, saved with Module.save_checkpoint; MXNet's output on a fixed input saved as .npy.
BUILD_SCRIPT = """
import sys
import mxnet as mx
import numpy as np

out, shape = sys.argv[1], (1, 3, 16, 16)
x = mx.sym.var("data")
x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv1")
x = mx.sym.BatchNorm(x, fix_gamma=False, name="bn1")
x = mx.sym.Activation(x, act_type="relu", name="relu1")
x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool1")
x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=10, name="fc1")
sym = mx.sym.softmax(x, name="prob")
rng = np.random.RandomState(0)
arg_shapes, _, aux_shapes = sym.infer_shape(data=shape)
args = {n: mx.nd.array(rng.standard_normal(s).astype("float32") * 0.3)
        for n, s in zip(sym.list_arguments(), arg_shapes) if n != "data"}
aux = {n: mx.nd.array(rng.uniform(0.5, 2.0, s) if n.endswith("_var") else rng.uniform(-0.5, 0.5, s))
       for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
mod.bind(data_shapes=[("data", shape)], for_training=False)
mod.set_params(args, aux)
mod.save_checkpoint(out + "/model", 0)
x = rng.standard_normal(shape).astype("float32")
mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
np.save(out + "/../x.npy", x)
np.save(out + "/../y.npy", mod.get_outputs()[0].asnumpy())
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding model-symbol.json + model-0000.params; x.npy / y.npy beside it."""
    python = mxnet_python()
    if not python.exists():
        pytest.skip(f"the MXNet environment is not installed ({python}); run make install")
    root = tmp_path_factory.mktemp("mxnet")
    (root / "model").mkdir()
    subprocess.run([str(python), "-I", "-c", BUILD_SCRIPT, str(root / "model")], check=True, timeout=300,
                   capture_output=True)
    return root / "model"


def test_ml_c4_artifact_matches_mxnet(checkpoint: Path, tmp_path: Path) -> None:
    # GIVEN an MXNet checkpoint (conv, batchnorm, relu, pooling, fully connected, softmax) and MXNet's own output
    x, ref = np.load(checkpoint.parent / "x.npy"), np.load(checkpoint.parent / "y.npy")
    # WHEN it is compiled for ml_c4 with DataInputConfig in dict form and run through kiln.runtime
    model = kiln.runtime.load(compile_artifact(checkpoint, "MXNET", "ml_c4", tmp_path,
                                               data_input_config='{"data": [1, 3, 16, 16]}'))
    (y,) = model.run({"data": x})
    # THEN it agrees with MXNet within float32 rounding, and the manifest names the input, output and framework
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    assert y.argmax() == ref.argmax()
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [("data", SHAPE, "float32")]
    assert [(s.shape, s.dtype) for s in model.outputs] == [((1, 10), "float32")]
    assert model.manifest["framework"] == "MXNET"
    assert "mxnet 1.9.1" in model.manifest["framework_version"]
    assert model.manifest["model_files"] == ["model-symbol.json", "model-0000.params"]


@pytest.mark.parametrize(("config", "expected"), [
    (None, "DataInputConfig is required for MXNET"),
    ('{"input": [1, 3, 16, 16]}', "data inputs are ['data']"),
    ('{"data": [1, 3, 8, 8]}', "mx.onnx could not export"),
])
def test_bad_data_input_config_is_a_client_error(checkpoint: Path, config: str | None, expected: str) -> None:
    # GIVEN the checkpoint and a missing, misnamed or wrongly shaped DataInputConfig
    # WHEN it is loaded
    with pytest.raises(ClientError) as info:
        load_model("MXNET", checkpoint, DataInputConfig.parse(config, "MXNET"), CompilerOptions())
    # THEN the error says what is wrong in one line
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_archive_without_symbol_file_is_a_client_error(checkpoint: Path, tmp_path: Path) -> None:
    # GIVEN an archive holding only the params file
    (tmp_path / "model-0000.params").write_bytes((checkpoint / "model-0000.params").read_bytes())
    # WHEN it is loaded
    with pytest.raises(ClientError) as info:
        load_model("MXNET", tmp_path, DataInputConfig.parse('{"data": [1, 3, 16, 16]}', "MXNET"), CompilerOptions())
    # THEN the error names the file that is missing and how to package the checkpoint
    assert "-symbol.json" in str(info.value) and "model-0000.params" in str(info.value)
