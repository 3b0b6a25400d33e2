"""SageMaker's inference-container contract, served over real compiled artifacts (kiln_serving under uvicorn)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from kiln import runtime
from kiln_serving.config import ServingSettings
from PIL import Image

from tests.conftest import tiny_onnx_model
from tests.serving.conftest import IMAGE_SHAPE, Server, image_model, two_input_model

RTOL, ATOL = 1e-5, 1e-6


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def onnx_runtime(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


X = np.random.default_rng(11).standard_normal((1, 8)).astype(np.float32)


# -- /ping --------------------------------------------------------------------------------------------------
def test_ping_is_503_until_the_model_is_loaded(start_server: Callable[..., Server], tiny_artifact: Path) -> None:
    # GIVEN a server whose model load is held back
    release = threading.Event()

    def slow_load() -> Any:
        release.wait(60)
        return runtime.load(tiny_artifact)

    server = start_server(ServingSettings(model=tiny_artifact), slow_load, wait=False)
    # WHEN it is pinged and invoked before the model is loaded
    early_ping = server.call("GET", "/ping")
    early_call = server.invoke(npy(X), "application/x-npy")
    release.set()
    server.wait_loaded()
    # THEN both are 503 saying it is loading; once loaded, /ping is 200 and names the target
    assert (early_ping.status, early_ping.json()["message"]) == (503, "the model is still loading")
    assert early_call.status == 503
    ready = server.call("GET", "/ping")
    assert ready.status == 200 and ready.json() == {"status": "ready", "target": "ml_c4"}


def test_ping_stays_503_with_the_reason_when_this_host_cannot_run_the_model(
        start_server: Callable[..., Server], tiny_artifact: Path, edited_artifact: Callable[..., Path]) -> None:
    # GIVEN an artifact that needs a CPU feature this host lacks
    needy = edited_artifact(tiny_artifact, lambda m: m["target"]["isa"].append("kiln_missing_feature"))
    # WHEN the server loads it
    server = start_server(ServingSettings(model=needy))
    # THEN /ping and /invocations are 503 with the host check's reason, and the server still answers
    ping = server.call("GET", "/ping")
    assert ping.status == 503
    assert "this host cannot run the model" in ping.json()["message"]
    assert "kiln_missing_feature" in ping.json()["message"]
    call = server.invoke(npy(X), "application/x-npy")
    assert call.status == 503 and "kiln_missing_feature" in call.json()["message"]


# -- content types ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content_type", "body"), [
    ("application/x-npy", npy(X)),
    ("application/x-npz", npz(x=X)),
    ("application/json", json.dumps(X.tolist()).encode()),
    ("application/json", json.dumps({"x": X.tolist()}).encode()),
    ("application/json; charset=utf-8", json.dumps({"x": X.tolist()}).encode()),
], ids=["npy", "npz", "json-list", "json-by-name", "json-charset"])
def test_each_content_type_gives_onnx_runtimes_outputs(tiny_server: Server, content_type: str, body: bytes) -> None:
    # GIVEN the tiny network served; WHEN one input is sent in each encoding
    reply = tiny_server.invoke(body, content_type)
    # THEN the JSON answer names the output and equals ONNX Runtime's
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    (expected,) = onnx_runtime(tiny_onnx_model(), {"x": X})
    np.testing.assert_allclose(np.asarray(reply.json()["y"], np.float32), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("accept", "kind"), [
    (None, "application/json"), ("*/*", "application/json"), ("application/json", "application/json"),
    ("application/x-npy", "application/x-npy"), ("application/x-npz", "application/x-npz"),
    ("text/csv;q=0.9, application/x-npy;q=0.5", "application/x-npy"),
    ("application/json;q=0.2, application/x-npz", "application/x-npz"),
])
def test_accept_picks_the_response_encoding(tiny_server: Server, accept: str | None, kind: str) -> None:
    # GIVEN an Accept header; WHEN the model is invoked
    reply = tiny_server.invoke(npy(X), "application/x-npy", accept)
    # THEN the body is in the chosen encoding and holds the model's output
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == kind
    (expected,) = onnx_runtime(tiny_onnx_model(), {"x": X})
    if kind == "application/json":
        got = np.asarray(reply.json()["y"], np.float32)
    elif kind == "application/x-npy":
        got = np.load(io.BytesIO(reply.body), allow_pickle=False)
    else:
        got = np.load(io.BytesIO(reply.body), allow_pickle=False)["y"]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_accept_with_no_known_encoding_is_406(tiny_server: Server) -> None:
    # GIVEN an Accept header naming only CSV; WHEN invoked; THEN 406 listing what the server writes
    reply = tiny_server.invoke(npy(X), "application/x-npy", "text/csv")
    assert reply.status == 406
    assert "application/x-npz" in reply.json()["message"]


def test_unknown_content_type_is_415(tiny_server: Server) -> None:
    # GIVEN a CSV body; WHEN invoked; THEN 415 listing the accepted types
    reply = tiny_server.invoke(b"1,2,3", "text/csv")
    assert reply.status == 415
    assert "application/x-npy" in reply.json()["message"]


def test_several_inputs_by_name(start_server: Callable[..., Server], two_input_artifact: Path) -> None:
    # GIVEN a model with inputs a and b
    server = start_server(ServingSettings(model=two_input_artifact))
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    (expected,) = onnx_runtime(two_input_model(), {"a": a, "b": b})
    # WHEN both are sent by name as .npz and as JSON
    for reply in (server.invoke(npz(a=a, b=b), "application/x-npz", "application/x-npz"),
                  server.invoke(json.dumps({"a": a.tolist(), "b": b.tolist()}).encode(), "application/json",
                                "application/x-npz")):
        # THEN the output equals ONNX Runtime's
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(np.load(io.BytesIO(reply.body))["z"], expected, rtol=RTOL, atol=ATOL)
    # AND a missing, an unknown input, or one bare .npy array is a 400 naming the inputs
    missing = server.invoke(npz(a=a), "application/x-npz")
    assert missing.status == 400 and "missing input 'b'" in missing.json()["message"]
    unknown = server.invoke(npz(a=a, b=b, c=b), "application/x-npz")
    assert unknown.status == 400 and "['c']" in unknown.json()["message"]
    bare = server.invoke(npy(a), "application/x-npy")
    assert bare.status == 400 and "a, b" in bare.json()["message"]


# -- images -------------------------------------------------------------------------------------------------
def picture(fmt: str) -> bytes:
    """A 16x12 RGB picture with distinct channels, encoded as ``fmt``."""
    yy, xx = np.mgrid[0:12, 0:16]
    rgb = np.stack([xx * 15, yy * 20, 255 - xx * 10], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What an NCHW [1, 3, 6, 8] input should hold: the picture as RGB, resized to 8x6, channels first."""
    with Image.open(io.BytesIO(data)) as opened:
        rgb = opened.convert("RGB").resize((8, 6), Image.Resampling.BILINEAR)
    return np.asarray(rgb, np.float32).transpose(2, 0, 1)[np.newaxis]


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_image_request_is_decoded_resized_and_laid_out_for_the_input(
        start_server: Callable[..., Server], image_artifact: Path, fmt: str, content_type: str) -> None:
    # GIVEN a model with one NCHW image input [1, 3, 6, 8] that returns twice its input
    server = start_server(ServingSettings(model=image_artifact))
    data = picture(fmt)
    # WHEN a larger picture is posted
    reply = server.invoke(data, content_type, "application/x-npy")
    # THEN the model saw the picture's RGB pixels resized to 8x6, channels first
    assert reply.status == 200, reply.body
    out = np.load(io.BytesIO(reply.body))
    assert out.shape == IMAGE_SHAPE
    np.testing.assert_allclose(out / 2, decoded(data), rtol=0, atol=1e-4)
    (expected,) = onnx_runtime(image_model(), {"image": decoded(data)})
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-4)


def test_image_scale_and_bias_are_applied(start_server: Callable[..., Server], image_artifact: Path) -> None:
    # GIVEN a server told to scale pixels to 0..1 and shift each channel
    server = start_server(ServingSettings(model=image_artifact, image_scale=1 / 255, image_bias=(-0.5, 0.0, 0.25)))
    data = picture("PNG")
    # WHEN a picture is posted
    reply = server.invoke(data, "image/png", "application/x-npy")
    # THEN each value is pixel / 255 + bias[channel]
    assert reply.status == 200, reply.body
    want = decoded(data) / 255 + np.array([-0.5, 0.0, 0.25], np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(np.load(io.BytesIO(reply.body)) / 2, want, rtol=0, atol=1e-5)


def test_images_are_refused_for_a_model_without_an_image_input_and_when_corrupt(
        tiny_server: Server, start_server: Callable[..., Server], image_artifact: Path) -> None:
    # GIVEN the tiny model (input x [1, 8]) WHEN sent a PNG THEN 415 naming its input
    reply = tiny_server.invoke(picture("PNG"), "image/png")
    assert reply.status == 415 and "x [1, 8] float32" in reply.json()["message"]
    # GIVEN the image model WHEN sent bytes that are no image THEN 400 naming the input
    server = start_server(ServingSettings(model=image_artifact))
    broken = server.invoke(b"\x89PNG not really", "image/png")
    assert broken.status == 400 and "input 'image'" in broken.json()["message"]


# -- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content_type", "body", "status", "words"), [
    ("application/x-npy", npy(np.zeros((1, 5), np.float32)), 400, ["input 'x'", "[1, 5]", "[1, 8]"]),
    ("application/json", b"[[1, 2, 3]]", 400, ["input 'x'", "[1, 3]", "[1, 8]"]),
    ("application/x-npy", npy(np.zeros((1, 8), np.complex64)), 400, ["input 'x'", "complex64", "float32"]),
    ("application/json", json.dumps({"x": [["a"] * 8]}).encode(), 400, ["input 'x'", "dtype", "float32"]),
    ("application/json", b"[[1, 2], [3]]", 400, ["input 'x'", "rectangular"]),
    ("application/json", b"{not json", 400, ["not valid JSON"]),
    ("application/x-npy", b"\x93NUMPY garbage", 400, ["input 'x'", ".npy"]),
    ("application/x-npz", npz(compressed=True, x=np.zeros((3000, 3000), np.float32)), 413, ["x [1, 8] float32", "inflates"]),
], ids=["npy-shape", "json-shape", "npy-dtype", "json-strings", "json-ragged", "json-syntax", "npy-corrupt",
        "npz-inflated-size"])
def test_bad_requests_are_4xx_naming_the_input(tiny_server: Server, content_type: str, body: bytes, status: int,
                                               words: list[str]) -> None:
    # GIVEN a request the model cannot take; WHEN it is sent
    reply = tiny_server.invoke(body, content_type)
    # THEN the status is a 4xx and the message says what is wrong with which input
    assert reply.status == status, reply.body
    message = reply.json()["message"]
    for word in words:
        assert word in message


def test_a_body_over_the_limit_is_413_naming_the_inputs(tiny_server: Server, start_server: Callable[..., Server],
                                                        tiny_artifact: Path) -> None:
    # GIVEN the tiny model (limit derived from its inputs: 8 MiB)
    # WHEN a request declares a 9 MiB body
    host, port = tiny_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/x-npy")
    connection.putheader("Content-Length", str(9 << 20))
    connection.endheaders()
    declared = connection.getresponse()
    # THEN it is refused from the header alone, naming the inputs and the setting that raises the limit
    assert declared.status == 413
    message = json.loads(declared.read())["message"]
    assert "x [1, 8] float32" in message and "KILN_SERVING_MAX_REQUEST_BYTES" in message
    connection.close()
    # AND a streamed (chunked, no Content-Length) body is cut off once it passes a configured limit; the whole
    # request goes out in one write, so the refusal cannot race the client's sending
    small = start_server(ServingSettings(model=tiny_artifact, max_request_bytes=1024))
    host, port = small.url.removeprefix("http://").split(":")
    chunk = b"\0" * 1000
    request = (b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-npy\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + b"3e8\r\n" + chunk + b"\r\n" + b"3e8\r\n" + chunk + b"\r\n" + b"0\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "at most 1024 bytes" in json.loads(body)["message"]


def test_a_failing_model_is_a_500_and_the_server_stays_up(
        start_server: Callable[..., Server], tiny_artifact: Path, edited_artifact: Callable[..., Path]) -> None:
    # GIVEN an artifact whose manifest lets through widths the compiled library was not built for
    loose = edited_artifact(tiny_artifact, lambda m: m["inputs"][0].update(shape=[1, -1]))
    server = start_server(ServingSettings(model=loose))
    # WHEN the model is run on one (TVM's VM refuses it)
    failed = server.invoke(npy(np.ones((1, 5), np.float32)), "application/x-npy")
    # THEN 500 with the model's error, without source paths
    assert failed.status == 500
    message = failed.json()["message"]
    assert message.startswith("the model failed on this request:") and "mismatch" in message
    assert "/" not in message  # the first line only: TVM appends C++ frames with source paths
    # AND the server is still up: /ping is 200 and a good request is answered
    assert server.call("GET", "/ping").status == 200
    good = server.invoke(npy(X), "application/x-npy")
    assert good.status == 200
    np.testing.assert_allclose(np.asarray(good.json()["y"], np.float32),
                               onnx_runtime(tiny_onnx_model(), {"x": X})[0], rtol=RTOL, atol=ATOL)


def test_concurrent_requests_each_get_their_own_answer(tiny_server: Server) -> None:
    # GIVEN 24 different inputs sent from 8 threads at once
    inputs = [np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda x: tiny_server.invoke(npy(x), "application/x-npy", "application/x-npy"),
                                inputs))
    # THEN every answer is the model's output for that request's input
    for x, reply in zip(inputs, replies, strict=True):
        assert reply.status == 200
        np.testing.assert_allclose(np.load(io.BytesIO(reply.body)), onnx_runtime(tiny_onnx_model(), {"x": x})[0],
                                   rtol=RTOL, atol=ATOL)


def test_execution_parameters_for_batch_transform(tiny_server: Server) -> None:
    # GIVEN the tiny model WHEN batch transform asks for execution parameters THEN one record at a time
    reply = tiny_server.call("GET", "/execution-parameters")
    assert reply.status == 200
    assert reply.json() == {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 8}
