"""Fixtures for the serving tests: small real models compiled once per session, the server on a free port."""

from __future__ import annotations

import json
import shutil
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import uvicorn
from kiln_serving.app import create_app
from kiln_serving.config import ServingSettings
from onnx import TensorProto, helper, numpy_helper

from tests.compiler.conftest import compile_artifact
from tests.conftest import tiny_onnx_model

IMAGE_SHAPE = (1, 3, 6, 8)  # NCHW: 3 channels, 6 rows, 8 columns


def two_input_model() -> onnx.ModelProto:
    """``z = a * b + 1`` on two [2, 3] inputs: a model that needs several inputs by name."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "one"], ["z"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def image_model() -> onnx.ModelProto:
    """``out = 2 * image`` on an NCHW [1, 3, 6, 8] image: the output shows exactly what the server decoded."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "two"], ["out"])], "image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(IMAGE_SHAPE))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(IMAGE_SHAPE))],
        [numpy_helper.from_array(np.full(1, 2.0, np.float32), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def compile_onnx(model: onnx.ModelProto, out: Path, target: str = "ml_c4") -> Path:
    """The model compiled by Kiln's compiler into ``out/model-TARGET.tar.gz`` (tests.compiler's job helper)."""
    model_dir = out / "model"
    model_dir.mkdir(parents=True)
    onnx.save(model, str(model_dir / "model.onnx"))
    return compile_artifact(model_dir, "ONNX", target, out)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests.conftest's tiny network (x [1, 8] -> y [1, 4]) compiled for ml_c4 (AVX2: runs here)."""
    return compile_onnx(tiny_onnx_model(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def two_input_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_onnx(two_input_model(), tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="session")
def image_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_onnx(image_model(), tmp_path_factory.mktemp("image"))


@pytest.fixture
def edited_artifact(tmp_path: Path) -> Callable[[Path, Callable[[dict[str, Any]], None]], Path]:
    """An artifact unpacked with its manifest changed by ``edit`` (the manifest is not among the digests)."""

    def make(artifact: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
        root = tmp_path / "edited"
        shutil.rmtree(root, ignore_errors=True)
        with tarfile.open(artifact) as tar:
            tar.extractall(root, filter="data")
        manifest = json.loads((root / "manifest.json").read_text())
        edit(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
        return root

    return make


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    """A serving process's routes on 127.0.0.1, with a urllib client."""

    url: str
    app: Any

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return Reply(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, dict(exc.headers), exc.read())

    def invoke(self, body: bytes, content_type: str, accept: str | None = None) -> Reply:
        headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
        return self.call("POST", "/invocations", body, headers)

    def wait_loaded(self, timeout: float = 120) -> None:
        assert self.app.state.host.wait(timeout), "the model did not finish loading"


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., Server]]:
    """Start kiln_serving's app under uvicorn on a free port (stopped at the end of the session)."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: ServingSettings, load: Callable[[], Any] | None = None, *, wait: bool = True) -> Server:
        app = create_app(settings, load=load)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        running.append((server, thread))
        served = Server(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
        if wait:
            served.wait_loaded()
        return served

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_server(start_server: Callable[..., Server], tiny_artifact: Path) -> Server:
    """The server over the tiny artifact's .tar.gz, loaded."""
    return start_server(ServingSettings(model=tiny_artifact))
