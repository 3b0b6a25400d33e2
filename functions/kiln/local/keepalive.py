"""HTTP/1.1 keep-alive for local mode's werkzeug servers (moto's endpoint and ``kiln serve``'s API).

werkzeug's development server answers every response with ``Connection: close`` (werkzeug 3.1:
http.server "doesn't know how to drain the stream before the next request line"), so every call
to the embedded stack — from the API workers, the in-process Lambda handlers, the Step Functions
interpreter and each compiler — and every client call to the API paid a new TCP connection and a
new server thread (measured: bench/results/2026-12-01-load-s6.md). botocore already pools
connections (``LocalClients.MAX_POOL_CONNECTIONS``); the server closing them was the waste.

:class:`KeepAliveHandlerMixin` keeps werkzeug's server (a thread per connection, so a request
that calls the same server back — a Lambda run in-process calling DynamoDB — never waits for a
pool thread) and lets an HTTP/1.1 connection carry the next request once this one is framed:
its body is read to its ``Content-Length`` (what the app left is drained; a chunked request body,
an app error or a body not fully received closes the connection, as before), the response has a
``Content-Length`` or is chunked (werkzeug does either under HTTP/1.1), and an idle connection is
closed after :data:`IDLE_TIMEOUT_SECONDS`. Anything else (HTTP/1.0, ``Connection: close`` from
the client, http.server's own error replies) keeps werkzeug's close.
"""

from __future__ import annotations

import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wsgi import LimitedStream

# An idle kept-alive connection ends after this long (its server thread with it); a client's pool
# opens a new one when it finds it closed.
IDLE_TIMEOUT_SECONDS = 120.0
_CLOSE = "kiln.keepalive.close"


class _RequestBody(LimitedStream):
    """One request's body on a kept-alive connection: reads stop at its ``Content-Length``."""

    def read(self, size: int = -1) -> bytes:
        # werkzeug's drain asks for 10 MB at a time: RawIOBase.read would allocate that much per request
        remaining = self.limit - self._pos
        if remaining <= 0:
            return b""
        return super().read(remaining if size < 0 else min(size, remaining))


class KeepAliveHandlerMixin:
    """Mixed in before a werkzeug ``WSGIRequestHandler`` (see the module doc)."""

    timeout: float | None = IDLE_TIMEOUT_SECONDS
    # http.server writes a response's headers and body in separate sends: with Nagle's algorithm on a
    # kept-alive connection the body waits for the client's delayed ACK (~40 ms, seen)
    disable_nagle_algorithm = True
    close_connection: bool
    rfile: Any
    request_version: str
    _body: _RequestBody | None = None
    _keep_alive = False

    def make_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().make_environ()  # type: ignore[misc]
        environ[_CLOSE] = self._close_after_response
        self._keep_alive = self.request_version == "HTTP/1.1" and not self.close_connection
        if environ.get("wsgi.input_terminated"):  # a chunked body: werkzeug reads it, we do not frame it
            self._keep_alive = False
            return environ
        try:
            length = max(0, int(environ.get("CONTENT_LENGTH") or 0))
        except ValueError:  # no body the app may read (as werkzeug's Request reads it), and close after
            length, self._keep_alive = 0, False
        # The app reads at most this request's body; werkzeug's post-response drain (it reads
        # self.rfile while the socket is readable) then reads only what the app left of it, never
        # the next request's line.
        self._body = _RequestBody(self.rfile, length)
        environ["wsgi.input"] = self.rfile = self._body  # run_wsgi puts the connection's reader back
        environ["wsgi.input_terminated"] = True
        return environ

    def _close_after_response(self) -> None:
        self._keep_alive = False

    def run_wsgi(self) -> None:
        connection_reader = self.rfile
        self._body = None
        self._keep_alive = False
        try:
            super().run_wsgi()  # type: ignore[misc]
        finally:
            body, self._body = self._body, None
            self.rfile = connection_reader
            if not self._keep_alive or body is None or not body.is_exhausted:
                self.close_connection = True
            self._keep_alive = False

    def send_header(self, keyword: str, value: str) -> None:
        # werkzeug sends "Connection: close" on every response; a framed HTTP/1.1 response need not
        if self._keep_alive and keyword.lower() == "connection" and value.lower() == "close":
            return
        super().send_header(keyword, value)  # type: ignore[misc]


class KeepAliveRequestHandler(KeepAliveHandlerMixin, WSGIRequestHandler):
    """werkzeug's request handler with HTTP/1.1 keep-alive."""


def close_on_error(app: Any) -> Any:
    """Wrap a WSGI app so that a request whose app raised (mid-response, where werkzeug's own error
    page could not frame the reply) closes its connection instead of carrying the next request."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            result = app(environ, start_response)
        except BaseException:
            environ.get(_CLOSE, lambda: None)()
            raise
        return _Guarded(result, environ)

    return wrapped


class _Guarded:
    """An app's response iterable; an error while iterating it closes the connection."""

    def __init__(self, result: Any, environ: dict[str, Any]) -> None:
        self._result, self._environ = result, environ

    def __iter__(self) -> Any:
        try:
            yield from self._result
        except BaseException:
            self._environ.get(_CLOSE, lambda: None)()
            raise

    def close(self) -> None:
        if hasattr(self._result, "close"):
            self._result.close()


def make_keepalive_server(host: str, port: int, app: Any, *, handler: type[WSGIRequestHandler] | None = None,
                          fd: int | None = None) -> BaseWSGIServer:
    """A threaded werkzeug server for ``app`` whose HTTP/1.1 connections stay open between requests.
    ``handler``: a werkzeug request handler class to extend (default werkzeug's own)."""
    base = handler or WSGIRequestHandler
    keep_alive = type(f"KeepAlive{base.__name__}", (KeepAliveHandlerMixin, base), {"protocol_version": "HTTP/1.1"})
    return make_server(host, port, close_on_error(app), threaded=True, request_handler=keep_alive, fd=fd)


class MotoServer:
    """moto's server app (what ``moto.server.ThreadedMotoServer`` serves) on ``host:port`` in a
    background thread, with keep-alive connections."""

    def __init__(self, host: str, port: int) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )

        self._server = make_keepalive_server(host, port, DomainDispatcherApplication(create_backend_app),
                                             handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-moto", daemon=True)

    def start(self) -> MotoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket (kept-alive connections end with their clients
        or the idle timeout; their threads are daemons)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
