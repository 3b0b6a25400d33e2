"""The HTTP routes of SageMaker's inference-container contract, on Starlette.

``GET /ping`` answers 200 once the model is loaded (its host check passed), 503 before and after
a failed load (with the reason). ``POST /invocations`` decodes the body by Content-Type, checks it
against the model's inputs (4xx naming the input), runs the model and encodes the outputs as
Accept asks. A model that fails on a request answers 500 with the error; the server stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln_serving import codec
from kiln_serving.codec import RequestError
from kiln_serving.config import ServingSettings
from kiln_serving.runtime import runtime

log = logging.getLogger("kiln_serving")


class ModelHost:
    """Loads the model on its own thread and runs every inference on that same thread.

    One thread because a Relax VM is not safe to call concurrently and TVM keeps one kernel thread
    pool per calling thread: requests queue here instead of multiplying the pool by the clients."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-model")
        self._loaded = threading.Event()
        self.model: Any = None
        self.error = ""

    def start(self) -> None:
        """Begin loading in the background; /ping says 503 until it is done."""
        self._executor.submit(self._load_model)

    def _load_model(self) -> None:
        try:
            model = self._load()
        except runtime.IncompatibleHostError as exc:
            self.error = f"this host cannot run the model: {exc}"
            log.error("%s; /ping answers 503", self.error)
        except Exception as exc:
            log.exception("loading the model failed")
            self.error = f"the model could not be loaded: {type(exc).__name__}: {_first_line(exc)}"
        else:
            self.model = model
            log.info("model ready: inputs %s, outputs %s", [codec.describe(s) for s in model.inputs],
                     [codec.describe(s) for s in model.outputs])
        self._loaded.set()

    def ready(self) -> Any:
        """The loaded model; RequestError(503) while loading or after a failed load."""
        if self.model is not None:
            return self.model
        if self._loaded.is_set():
            raise RequestError(503, self.error)
        raise RequestError(503, "the model is still loading")

    def wait(self, timeout: float) -> bool:
        """Block until loading ended (either way); False on timeout."""
        return self._loaded.wait(timeout)

    async def run(self, feeds: dict[str, Any]) -> list[Any]:
        """The model's outputs for ``feeds``, computed on the model thread."""
        outputs: list[Any] = await asyncio.wrap_future(self._executor.submit(self.model.run, feeds))
        return outputs

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_app(settings: ServingSettings, *, load: Callable[[], Any] | None = None) -> Starlette:
    """The server over the artifact at ``settings.model`` (``load`` replaces how the model is loaded)."""
    host = ModelHost(load or (lambda: runtime.load(settings.model)))
    image = codec.ImageOptions(settings.image_scale, settings.image_bias)

    async def ping(request: Request) -> Response:
        model = host.ready()
        return JSONResponse({"status": "ready", "target": model.manifest.get("target", {}).get("name")})

    async def execution_parameters(request: Request) -> Response:
        # Batch transform asks this before sending records: one at a time, bodies up to the limit.
        model = host.ready()
        limit = codec.body_limit(model.inputs, settings.max_request_bytes)
        return JSONResponse({"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD",
                             "MaxPayloadInMB": max(1, limit >> 20)})

    async def invocations(request: Request) -> Response:
        model = host.ready()
        kind = codec.choose_response_type(request.headers.get("accept"))
        limit = codec.body_limit(model.inputs, settings.max_request_bytes)
        body = await _read_body(request, limit, model.inputs)
        feeds = await run_in_threadpool(codec.decode, request.headers.get("content-type"), body, model.inputs,
                                        image, limit)
        try:
            outputs = await host.run(feeds)
        except Exception as exc:  # the inputs were checked: whatever fails now is the model's
            log.exception("the model failed on a request")
            raise RequestError(500, f"the model failed on this request: {type(exc).__name__}: "
                                    f"{_first_line(exc)}") from None
        encoded = await run_in_threadpool(codec.encode, outputs, model.outputs, kind)
        return Response(encoded, media_type=kind)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return JSONResponse({"message": exc.message}, status_code=exc.status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        host.start()
        yield
        host.close()

    app = Starlette(routes=[Route("/ping", ping, methods=["GET"]),
                            Route("/invocations", invocations, methods=["POST"]),
                            Route("/execution-parameters", execution_parameters, methods=["GET"])],
                    exception_handlers={RequestError: refused}, lifespan=lifespan)
    app.state.host = host
    return app


async def _read_body(request: Request, limit: int, inputs: Any) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise codec.too_large(int(declared), limit, inputs)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise codec.too_large(size, limit, inputs)
        chunks.append(chunk)
    return b"".join(chunks)


def _first_line(exc: BaseException) -> str:
    """An error's first line (TVM appends C++ frames and source paths after it), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
