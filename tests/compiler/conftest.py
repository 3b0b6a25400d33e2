"""Shared fixtures for the compiler tests: real models, archives, a moto S3 server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import boto3
import numpy as np
import onnx
import pytest
from kiln.catalog import Target, TargetCatalog
from kiln_compiler import CompilerOptions, compile_model
from kiln_compiler.package import package
from kiln_compiler.samples import load_light_model, quantize_qdq, quantize_qoperator

os.environ.setdefault("TVM_NUM_THREADS", "2")

LIGHT_DIR = Path(onnx.__file__).parent / "backend/test/data/light"


def randomized_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """One of onnx's light models with random weights (see ``kiln_compiler.samples``)."""
    return load_light_model(name, seed)


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    """A .tar.gz holding ``files`` (name -> content)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def squeezenet() -> onnx.ModelProto:
    """SqueezeNet 1.0 (opset 9) with random weights; input data_0 [1,3,224,224]."""
    return randomized_light_model("squeezenet")


@pytest.fixture(scope="session")
def squeezenet_dir(tmp_path_factory: pytest.TempPathFactory, squeezenet: onnx.ModelProto) -> Path:
    """An unpacked archive directory holding model.onnx."""
    d = tmp_path_factory.mktemp("squeezenet")
    onnx.save(squeezenet, str(d / "model.onnx"))
    (d / "labels.txt").write_text("\n".join(f"class{i}" for i in range(1000)))
    return d


def elf_header(path: Path) -> tuple[int, int, int]:
    """(EI_CLASS, e_machine, e_flags) of an ELF file."""
    data = path.read_bytes()[:64]
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    machine = int.from_bytes(data[18:20], order)
    flags = int.from_bytes(data[48:52] if data[4] == 2 else data[36:40], order)
    return data[4], machine, flags


EM_X86_64, EM_AARCH64, EM_ARM = 62, 183, 40
EF_ARM_ABI_FLOAT_HARD = 0x400


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server on a free loopback port; yields its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def target_named(name: str) -> Target:
    """A catalog target by TargetDevice (``ml_c4``) or platform (``LINUX:X86_64:NVIDIA``)."""
    catalog = TargetCatalog()
    return catalog.platform(*name.split(":")) if ":" in name else catalog.device(name)


def compile_artifact(model_dir: Path, framework: str, target: str, out: Path, *, options: str | None = None,
                     data_input_config: str | None = None) -> Path:
    """``compile_model`` then ``package``, as a job does; returns the artifact (.tar.gz).

    ``options`` is the CompilerOptions string, parsed with the target's rules as the job parses it."""
    tgt = target_named(target)
    opts = CompilerOptions.parse(options, tgt)
    result = compile_model(model_dir, framework, tgt, opts, out_dir=out / "build", data_input_config=data_input_config)
    return package(result, tgt, out / f"model-{tgt.name}.tar.gz", model_dir=model_dir,
                   labels_name=opts.class_labels).path


def disassemble(lib: Path, tool: str = "objdump") -> str:
    """objdump's disassembly of a shared library (``tool``: a cross toolchain's, e.g. aarch64-linux-gnu-objdump)."""
    import shutil

    objdump = shutil.which(tool)
    assert objdump is not None, f"binutils' {tool} is needed to inspect the generated code"
    return subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout


def kernel_asm(asm: str, name: str) -> str:
    """The disassembly of the kernel function ``name`` (objdump prints one ``<symbol>:`` block per function)."""
    blocks = re.split(r"\n(?=[0-9a-f]+ <)", asm)
    found = [b for b in blocks if re.match(rf"[0-9a-f]+ <{re.escape(name)}(_compute_)?>:", b)]
    assert found, f"no function {name} in the library"
    return "\n".join(found)


def compile_and_disassemble(mod: Any, mcpu: str, lib: Path) -> tuple[Any, str]:
    """(VM executable, disassembly) of ``mod`` compiled by Kiln's CPU pipeline for ``mcpu``, exported to ``lib``;
    asserts that every kernel got a schedule."""
    from kiln_compiler.pipeline import compile_relax

    compiled = compile_relax(mod, {"kind": "llvm", "mcpu": mcpu})
    assert compiled.unscheduled == []
    compiled.executable.export_library(str(lib))
    return compiled.executable, disassemble(lib)


ROLE = "arn:aws:iam::123456789012:role/KilnUserModelAccess"


@pytest.fixture()
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS settings pointing at the moto server (also set in this process)."""
    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "TVM_NUM_THREADS": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


def entrypoint_job(name: str, s3_uri: str, **output: Any) -> dict[str, Any]:
    """The KILN_JOB of an ONNX job (SqueezeNet's input) for ``python -m kiln_compiler``."""
    return {
        "CompilationJobName": name,
        "CompilationJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:compilation-job/{name}",
        "RoleArn": ROLE,
        "InputConfig": {"S3Uri": s3_uri, "Framework": "ONNX", "DataInputConfig": '{"data_0": [1, 3, 224, 224]}'},
        "OutputConfig": {"S3OutputLocation": "s3://user-out/compiled", "TargetDevice": "ml_c4", **output},
        "StoppingCondition": {"MaxRuntimeInSeconds": 900},
    }


def run_entrypoint(job: dict[str, Any], env: dict[str, str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run the container entrypoint as a process, the job in its environment and ``tmp_path`` as work dir."""
    return subprocess.run([sys.executable, "-m", "kiln_compiler"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "KILN_JOB": json.dumps(job), "KILN_WORK_DIR": str(tmp_path),
                               **extra}, check=False)


@pytest.fixture()
def buckets(aws_env: dict[str, str]) -> Any:
    """The user's model and output buckets on the moto server; an S3 client."""
    s3 = boto3.client("s3")
    for b in ("user-models", "user-out"):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=b)
    return s3


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """Three convolutions (3x3 stride 2 padded, 3x3 padded, 1x1) with bias and relu, global average pool,
    flatten; input ``input`` [1,3,32,32], opset 13."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i, (cin, cout, k, stride, pad) in enumerate([(3, 16, 3, 2, 1), (16, 32, 3, 1, 1), (32, 32, 1, 1, 0)]):
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype("float32")
        inits += [numpy_helper.from_array(w, f"c{i}_w"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype("float32"), f"c{i}_b")]
        nodes += [helper.make_node("Conv", [x, f"c{i}_w", f"c{i}_b"], [f"c{i}"], kernel_shape=[k, k],
                                   strides=[stride] * 2, pads=[pad] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def fire_lrn_cnn(seed: int = 0) -> onnx.ModelProto:
    """SqueezeNet's fire module and Inception's local response normalisation in one small CNN: conv 3->16
    3x3 + relu, LRN (size 5), max pool 2x2, squeeze 1x1 16->16 read by two expand convs (1x1 and 3x3,
    16->32 each), concat, max pool 3x3 stride 2, conv 64->32 1x1, global average pool, flatten;
    input ``input`` [1,3,32,32], output [1,32], opset 13."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, cin: int, cout: int, k: int) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype("float32")
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype("float32"), f"{name}_b")])
        nodes.extend([helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                       pads=[k // 2] * 4),
                      helper.make_node("Relu", [f"{name}_c"], [name])])
        return name

    stem = conv("stem", "input", 3, 16, 3)
    nodes += [helper.make_node("LRN", [stem], ["lrn"], size=5, alpha=1e-4, beta=0.75, bias=1.0),
              helper.make_node("MaxPool", ["lrn"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2])]
    squeeze = conv("squeeze", "pool1", 16, 16, 1)
    expand = [conv("expand1", squeeze, 16, 32, 1), conv("expand3", squeeze, 16, 32, 3)]
    nodes += [helper.make_node("Concat", expand, ["cat"], axis=1),
              helper.make_node("MaxPool", ["cat"], ["pool2"], kernel_shape=[3, 3], strides=[2, 2])]
    head = conv("head", "pool2", 64, 32, 1)
    nodes += [helper.make_node("GlobalAveragePool", [head], ["gap"]), helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "fire_lrn_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def residual_bn_block(seed: int = 0) -> onnx.ModelProto:
    """A ResNet bottleneck as the light ResNet-50 writes it: convolutions without bias, each followed by
    BatchNormalization (+ Relu), a 1x1 projection shortcut, Sum, Relu, global average pool, flatten;
    input ``input`` [1,16,16,16], opset 13, 16-64 channels."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv_bn(name: str, x: str, cin: int, cout: int, k: int, relu: bool) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype("float32")
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array((1 + 0.1 * rng.standard_normal(cout)).astype("float32"), f"{name}_s"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype("float32"), f"{name}_b"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype("float32"), f"{name}_m"),
                      numpy_helper.from_array((1 + 0.1 * rng.random(cout)).astype("float32"), f"{name}_v")])
        nodes.extend([helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], kernel_shape=[k, k],
                                       pads=[k // 2] * 4),
                      helper.make_node("BatchNormalization", [f"{name}_c", f"{name}_s", f"{name}_b", f"{name}_m",
                                                              f"{name}_v"], [f"{name}_bn"])])
        if not relu:
            return f"{name}_bn"
        nodes.append(helper.make_node("Relu", [f"{name}_bn"], [f"{name}_r"]))
        return f"{name}_r"

    a = conv_bn("a", "input", 16, 16, 1, True)
    b = conv_bn("b", a, 16, 16, 3, True)
    c = conv_bn("c", b, 16, 64, 1, False)
    shortcut = conv_bn("s", "input", 16, 64, 1, False)
    nodes += [helper.make_node("Sum", [c, shortcut], ["sum"]), helper.make_node("Relu", ["sum"], ["out"]),
              helper.make_node("GlobalAveragePool", ["out"], ["gap"]), helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "residual_bn_block",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def qdq_residual_block_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding the QDQ-quantized ``residual_bn_block`` (batch norms not folded, as
    quantize_static leaves them without pre-processing: Q/DQ around each) as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_residual", residual_bn_block())


def data_movement_cnn(seed: int = 0) -> onnx.ModelProto:
    """What SqueezeNet, Inception and ShuffleNet do between their convolutions, small: a 3-channel stem
    (3x3 stride 2, relu; 23 output columns, prime as SqueezeNet's 111), a 3x3 stride-2 max pool, a fire module (1x1 squeeze, 1x1 and 3x3 expands,
    concat), a channel shuffle (reshape, transpose, reshape; 2 groups), a grouped 1x1 convolution
    (2 groups) with relu, a depthwise 3x3, global average pool, flatten; input ``input`` [1,3,46,46],
    opset 13."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             relu: bool = True) -> str:
        w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype("float32")
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype("float32"), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                      strides=[stride] * 2, pads=[k // 2] * 4, group=group))
        if not relu:
            return f"{name}_c"
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return f"{name}_r"

    stem = conv("stem", "input", 3, 16, 3, stride=2)  # 23x23
    nodes.append(helper.make_node("MaxPool", [stem], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    squeeze = conv("squeeze", "pool", 16, 16, 1)  # 12x12
    expand1, expand3 = conv("expand1", squeeze, 16, 16, 1), conv("expand3", squeeze, 16, 16, 3)
    nodes.append(helper.make_node("Concat", [expand1, expand3], ["fire"], axis=1))
    inits += [numpy_helper.from_array(np.array(s, "int64"), n) for n, s in
              (("split_shape", [1, 2, 16, 12, 12]), ("flat_shape", [1, 32, 12, 12]))]
    nodes += [helper.make_node("Reshape", ["fire", "split_shape"], ["groups"]),
              helper.make_node("Transpose", ["groups"], ["swapped"], perm=[0, 2, 1, 3, 4]),
              helper.make_node("Reshape", ["swapped", "flat_shape"], ["shuffled"])]
    grouped = conv("grouped", "shuffled", 32, 32, 1, group=2)
    depthwise = conv("depthwise", grouped, 32, 32, 3, group=32, relu=False)
    nodes += [helper.make_node("GlobalAveragePool", [depthwise], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "data_movement_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 46, 46])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def qdq_data_movement_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding the QDQ-quantized ``data_movement_cnn`` (a Q/DQ pair around every pool,
    concat, reshape and transpose, as quantize_static writes them) as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_data_movement", data_movement_cnn())


def dense_block_cnn(seed: int = 0, head: bool = True) -> onnx.ModelProto:
    """DenseNet-121's layers as its light model writes them, small: each pre-activation is BatchNormalization
    -> Mul by an Unsqueeze'd per-channel constant -> Add of one -> Relu; a 3x3 stem (16 -> 32), two dense
    layers (pre-activation, 1x1 conv to 32, pre-activation, 3x3 conv to 16, concat onto the block's input:
    32 -> 48 -> 64 channels), a transition (pre-activation, 1x1 conv 64 -> 32, 2x2 average pool), a final
    pre-activation, global average pool and a 1x1 conv classifier; input ``input`` [1, 16, 16, 16], output
    [1, 10, 1, 1], opset 13. ``head=False`` ends at the transition's convolution (output [1, 32, 16, 16]): no
    average pool, whose .5 ties ONNX Runtime breaks by its own float32 rounding."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def vector(name: str, values: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(values.astype("float32"), name))
        return name

    def preactivation(name: str, x: str, channels: int) -> str:
        bn = [vector(f"{name}_{p}", v) for p, v in (("s", 1 + 0.1 * rng.standard_normal(channels)),
                                                     ("b", 0.1 * rng.standard_normal(channels)),
                                                     ("m", 0.1 * rng.standard_normal(channels)),
                                                     ("v", 1 + 0.1 * rng.random(channels)))]
        scale = vector(f"{name}_scale", rng.uniform(0.9, 1.1, channels))
        shift = vector(f"{name}_sh", 0.1 * rng.standard_normal(channels))
        nodes.extend([helper.make_node("BatchNormalization", [x, *bn], [f"{name}_bn"]),
                      helper.make_node("Unsqueeze", [scale, "hw_axes"], [f"{name}_wu"]),
                      helper.make_node("Mul", [f"{name}_bn", f"{name}_wu"], [f"{name}_mul"]),
                      helper.make_node("Unsqueeze", [shift, "hw_axes"], [f"{name}_shu"]),
                      helper.make_node("Add", [f"{name}_mul", f"{name}_shu"], [f"{name}_add"]),
                      helper.make_node("Relu", [f"{name}_add"], [f"{name}_r"])])
        return f"{name}_r"

    def conv(name: str, x: str, cin: int, cout: int, k: int) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype("float32")
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], kernel_shape=[k, k], pads=[k // 2] * 4))
        return f"{name}_c"

    inits.append(numpy_helper.from_array(np.array([1, 2], "int64"), "hw_axes"))
    block = preactivation("stem", conv("stem", "input", 16, 32, 3), 32)
    channels = 32
    for i in range(2):
        y = conv(f"d{i}b", preactivation(f"d{i}a", block, channels), channels, 32, 1)
        y = conv(f"d{i}c", preactivation(f"d{i}b", y, 32), 32, 16, 3)
        nodes.append(helper.make_node("Concat", [block, y], [f"d{i}_cat"], axis=1))
        block, channels = f"d{i}_cat", channels + 16
    y = conv("t", preactivation("ta", block, channels), channels, 32, 1)
    shape = [1, 32, 16, 16]
    if head:
        nodes.append(helper.make_node("AveragePool", [y], ["pool"], kernel_shape=[2, 2], strides=[2, 2]))
        nodes.append(helper.make_node("GlobalAveragePool", [preactivation("f", "pool", 32)], ["gap"]))
        y, shape = conv("cls", "gap", 32, 10, 1), [1, 10, 1, 1]
    nodes[-1].output[0] = "output"  # the last convolution's
    graph = helper.make_graph(nodes, "dense_block_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="session")
def qdq_dense_block_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding the QDQ-quantized ``dense_block_cnn`` (quantize_static: a Q/DQ pair around
    every batch norm, Mul, Add and concat, the per-channel Mul/Add constants quantized as activations, each
    Relu folded into its Q) as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_dense_block", dense_block_cnn())


@pytest.fixture(scope="session")
def qdq_dense_layers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``qdq_dense_block_dir``'s model without its head: it ends at the transition's convolution."""
    return _qdq_archive(tmp_path_factory, "qdq_dense_layers", dense_block_cnn(head=False))


def grouped_pointwise_cnn(seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet's awkward grouped 1x1 layers, small: a 3x3 stem (3 -> 24, relu), a grouped 1x1 conv with 6
    input and 20 output channels per group (4 groups, relu), one with 20 input and 17 output channels per
    group (4 groups), global average pool, flatten; input ``input`` [1, 3, 16, 16], output [1, 68], opset 13."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for name, cin, cout, k, group, relu in (("stem", 3, 24, 3, 1, True), ("g1", 24, 80, 1, 4, True),
                                            ("g2", 80, 68, 1, 4, False)):
        w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype("float32")
        inits += [numpy_helper.from_array(w, f"{name}_w"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype("float32"), f"{name}_b")]
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                      pads=[k // 2] * 4, group=group))
        x = f"{name}_c"
        if relu:
            nodes.append(helper.make_node("Relu", [x], [f"{name}_r"]))
            x = f"{name}_r"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "grouped_pointwise_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 68])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def grouped_residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet's residual unit without its shuffle and depthwise conv, small: a 3x3 stem (3 -> 136, relu), two
    grouped 1x1 convs with 34 input and output channels per group (4 groups; relu after the first), the stem's
    output added to the second's, relu, global average pool, flatten; input ``input`` [1, 3, 16, 16], output
    [1, 136], opset 13."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for name, cin, k, group in (("stem", 3, 3, 1), ("g1", 136, 1, 4), ("g2", 136, 1, 4)):
        w = (rng.standard_normal((136, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype("float32")
        inits += [numpy_helper.from_array(w, f"{name}_w"),
                  numpy_helper.from_array((rng.standard_normal(136) * 0.1).astype("float32"), f"{name}_b")]
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                      pads=[k // 2] * 4, group=group))
        x = f"{name}_c"
        if name != "g2":
            nodes.append(helper.make_node("Relu", [x], [f"{name}_r"]))
            x = f"{name}_r"
    nodes += [helper.make_node("Add", ["g2_c", "stem_r"], ["sum"]), helper.make_node("Relu", ["sum"], ["sum_r"]),
              helper.make_node("GlobalAveragePool", ["sum_r"], ["gap"]), helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "grouped_residual_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 136])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def qdq_grouped_residual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding the QDQ-quantized ``grouped_residual_cnn`` as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_grouped_residual", grouped_residual_cnn())


@pytest.fixture(scope="session")
def qdq_grouped_pointwise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding the QDQ-quantized ``grouped_pointwise_cnn`` as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_grouped_pointwise", grouped_pointwise_cnn())


@pytest.fixture(scope="session")
def qdq_small_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding the QDQ-quantized ``small_cnn`` as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_small_cnn", small_cnn())


@pytest.fixture(scope="session")
def qdq_squeezenet_dir(tmp_path_factory: pytest.TempPathFactory, squeezenet: onnx.ModelProto) -> Path:
    """An unpacked archive holding SqueezeNet 1.0 quantized to QDQ (opset 13) as model.onnx."""
    return _qdq_archive(tmp_path_factory, "qdq_squeezenet", squeezenet)


CALIBRATION = "calib/samples.npz"  # where calibrated_dir keeps its calibration inputs


def calibration_samples(count: int = 8, seed: int = 1) -> np.ndarray:
    """Representative inputs for the small CNN: [samples, 3, 32, 32] (its input is [1, 3, 32, 32])."""
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype("float32")


@pytest.fixture(scope="session")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive: the fp32 small CNN as model.onnx and its calibration inputs in calib/samples.npz."""
    d = tmp_path_factory.mktemp("calibrated") / "archive"
    (d / "calib").mkdir(parents=True)
    onnx.save(small_cnn(), str(d / "model.onnx"))
    np.savez(d / CALIBRATION, input=calibration_samples())
    return d


def qoperator_ops_cnn(seed: int = 0) -> onnx.ModelProto:
    """A float network whose QOperator quantization holds every quantized operator quantize_static writes for
    CNNs: Conv, LeakyRelu, Sigmoid, Add, Mul, Concat, AveragePool, GlobalAveragePool, Gemm (transB), MatMul,
    Softmax; input ``input`` [1,8,16,16], opset 13."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("float32"), name)

    inits = [init("w", (16, 8, 3, 3), 1 / np.sqrt(72)), init("b", (16,), 0.1), init("g_w", (32, 32), 0.25),
             init("g_b", (32,), 0.1), init("m_w", (32, 10), 0.5)]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["conv"], ["leaky"], alpha=0.1),
             helper.make_node("Sigmoid", ["leaky"], ["sig"]),
             helper.make_node("Add", ["conv", "sig"], ["add"]),
             helper.make_node("Mul", ["add", "leaky"], ["mul"]),
             helper.make_node("Concat", ["mul", "add"], ["cat"], axis=1),
             helper.make_node("AveragePool", ["cat"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["pool"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "g_w", "g_b"], ["gemm"], transB=1),
             helper.make_node("MatMul", ["gemm", "m_w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["output"], axis=-1)]
    graph = helper.make_graph(nodes, "qoperator_ops_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _archive_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, Path]:
    """(scratch directory, empty archive directory inside it) for a session fixture."""
    work = tmp_path_factory.mktemp(name)
    d = work / "archive"
    d.mkdir()
    return work, d


def _qdq_archive(tmp_path_factory: pytest.TempPathFactory, name: str, model: onnx.ModelProto) -> Path:
    """An archive directory holding ``model`` quantized to QDQ by ``quantize_qdq`` as model.onnx."""
    work, d = _archive_dir(tmp_path_factory, name)
    onnx.save(quantize_qdq(model, work / "quantize"), str(d / "model.onnx"))
    return d


@pytest.fixture(scope="session")
def qop_small_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding ``small_cnn`` quantized to QOperator (QLinearConv, QLinearGlobalAveragePool)."""
    work, d = _archive_dir(tmp_path_factory, "qop_small_cnn")
    onnx.save(quantize_qoperator(small_cnn(), work / "quantize"), str(d / "model.onnx"))
    return d


@pytest.fixture(scope="session")
def reference_qdq(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """The QDQ model onnxruntime's quantize_static makes from the same fp32 model and calibration inputs,
    as a user would run it (QDQ, per-channel s8 weights, u8 activations), all samples in one pass."""
    return quantize_qdq(small_cnn(), tmp_path_factory.mktemp("reference_qdq"), images=calibration_samples())


@pytest.fixture(scope="session")
def qop_ops_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding ``qoperator_ops_cnn`` quantized to QOperator (twelve quantized operators)."""
    work, d = _archive_dir(tmp_path_factory, "qop_ops_cnn")
    onnx.save(quantize_qoperator(qoperator_ops_cnn(), work / "quantize"), str(d / "model.onnx"))
    return d


@pytest.fixture(scope="session")
def qop_squeezenet_dir(tmp_path_factory: pytest.TempPathFactory, squeezenet: onnx.ModelProto) -> Path:
    """An unpacked archive holding SqueezeNet 1.0 quantized to QOperator (QLinearConv, QLinearConcat,
    QLinearGlobalAveragePool, QLinearSoftmax)."""
    work, d = _archive_dir(tmp_path_factory, "qop_squeezenet")
    onnx.save(quantize_qoperator(squeezenet, work / "quantize"), str(d / "model.onnx"))
    return d


@pytest.fixture(scope="session")
def dynamic_small_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding ``small_cnn`` quantized by ``quantize_dynamic`` (DynamicQuantizeLinear,
    ConvInteger, Cast, Mul)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work, d = _archive_dir(tmp_path_factory, "dynamic_small_cnn")
    onnx.save(small_cnn(), str(work / "fp32.onnx"))
    quantize_dynamic(str(work / "fp32.onnx"), str(d / "model.onnx"), weight_type=QuantType.QInt8)
    return d


@pytest.fixture(scope="session")
def old_ir_qdq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive holding ``small_cnn`` saved as IR version 3 (initializers listed as graph inputs, as
    old exporters wrote them) and quantized to QDQ: quantize_static keeps IR version 3 but adds its scales and
    zero points as initializers only, which IR 3 forbids."""
    from onnx import helper

    model = small_cnn()
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in model.graph.initializer)
    return _qdq_archive(tmp_path_factory, "old_ir_qdq", model)


def shuffle_unit(channels: int, groups: int, hw: int, residual: bool = False) -> Any:
    """ShuffleNet's unit as ONNX spells it: grouped 1x1 conv, batch-norm-like scale and shift,
    relu, the NCHW channel shuffle (reshape, swap, reshape), depthwise 3x3, grouped 1x1 conv;
    ``residual``: with a scale and shift after both later convs, the unit's input added and a relu."""
    from tvm import relax
    from tvm.script import relax as R

    rng = np.random.default_rng(channels)

    def const(*shape: int) -> Any:
        return relax.const(rng.standard_normal(shape).astype("float32") / np.sqrt(shape[1] if len(shape) == 4 else 1))

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, channels, hw, hw), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(channels, channels // groups, 1, 1), groups=groups))
            y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.multiply(y, const(1, channels, 1, 1)),
                                                      const(1, channels, 1, 1))))
            y = bb.emit(relax.op.reshape(y, (1, groups, channels // groups, hw, hw)))
            y = bb.emit(relax.op.reshape(relax.op.permute_dims(y, [0, 2, 1, 3, 4]), (1, channels, hw, hw)))
            y = bb.emit(relax.op.nn.conv2d(y, const(channels, 1, 3, 3), padding=1, groups=channels))
            if residual:
                y = bb.emit(relax.op.add(relax.op.multiply(y, const(1, channels, 1, 1)), const(1, channels, 1, 1)))
            y = bb.emit(relax.op.nn.conv2d(y, const(channels, channels // groups, 1, 1), groups=groups))
            if residual:
                y = bb.emit(relax.op.add(relax.op.multiply(y, const(1, channels, 1, 1)), const(1, channels, 1, 1)))
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, x)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def sliced_conv_block(seed: int = 0) -> Any:
    """A convolution whose output channels are not whole vectors, small: a 3x3 stride-2 convolution 3 -> 40
    channels (padded to 48 and sliced back by ``PadConvChannels``), bias, relu, a 3x3 stride-2 max pool,
    a 1x1 convolution 40 -> 48; input [1, 3, 64, 64] (NCHW, Relax)."""
    from tvm import relax
    from tvm.script import relax as R

    rng = np.random.default_rng(seed)

    def const(*shape: int) -> Any:
        return relax.const((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype("float32"))

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 3, 64, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(40, 3, 3, 3), strides=2, padding=1))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, const(1, 40, 1, 1))))
            y = bb.emit(relax.op.nn.max_pool2d(y, 3, 2, 1))
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(y, const(48, 40, 1, 1))))
        bb.emit_func_output(out)
    return bb.get()
