"""Shared fixtures for the compiler tests: real models, archives, a moto S3 server."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

os.environ.setdefault("TVM_NUM_THREADS", "2")

LIGHT_DIR = Path(onnx.__file__).parent / "backend/test/data/light"


def randomized_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """One of onnx's light models with its ConstantOfShape weights replaced by random initializers.

    The light models' constant weights make every output identical (a uniform softmax),
    which would hide wrong results; random weights make the comparison meaningful.
    """
    model = onnx.load(str(LIGHT_DIR / f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    shapes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[node.input[0]])
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            values = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
            if len(shape) == 1:
                values = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    names = {i.name for i in inits}
    graph_inputs = [i for i in model.graph.input if i.name in used and (i.name not in shapes or i.name in names)]
    graph_inputs = [i for i in graph_inputs if not i.name.endswith("__SHAPE")]
    # IR version 3 wants every initializer listed as a graph input too (the loader must skip them).
    present = {i.name for i in graph_inputs}
    graph_inputs += [onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                     for i in inits if i.name not in present]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    onnx.checker.check_model(model)
    return model


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
