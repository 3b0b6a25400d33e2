"""``kiln serve``: the API over plain HTTP, each request turned into an API Gateway proxy event
for the very Lambda handler that runs in AWS."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from werkzeug.serving import BaseWSGIServer
from werkzeug.wrappers import Request, Response

from kiln.local.keepalive import make_keepalive_server
from kiln.local.stack import ACCOUNT

log = logging.getLogger("kiln.serve")
# The handler is a Lambda handler: Powertools' resolver keeps the request being resolved on itself
# (``app.current_event``), so a process runs one at a time, as a Lambda execution environment does
# (seen without this: a DescribeCompilationJob resolved with a concurrent List's body). More
# requests at once take more processes (``kiln serve --api-workers``).
_ONE_REQUEST_AT_A_TIME = threading.Lock()


class _Context:
    function_name = "kiln-api"
    function_version = "$LATEST"
    invoked_function_arn = f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:kiln-api"
    memory_limit_in_mb = 512
    log_group_name = "/aws/lambda/kiln-api"
    log_stream_name = "local"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 29_000


def proxy_event(request: Request) -> dict[str, Any]:
    """The API Gateway (REST, proxy integration) event AWS would send for this request."""
    headers: dict[str, str] = {}
    multi_headers: dict[str, list[str]] = {}
    for key, value in request.headers.items():
        headers[key] = value
        multi_headers.setdefault(key, []).append(value)
    query = {k: request.args.getlist(k)[-1] for k in request.args}
    multi_query = {k: request.args.getlist(k) for k in request.args}
    body = request.get_data(as_text=True)
    now = time.time()
    return {
        "resource": "/{proxy+}" if request.path != "/" else "/",
        "path": request.path,
        "httpMethod": request.method,
        "headers": headers,
        "multiValueHeaders": multi_headers,
        "queryStringParameters": query or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": {"proxy": request.path.lstrip("/")} if request.path != "/" else None,
        "stageVariables": None,
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": "kiln-local",
            "resourceId": "local",
            "resourcePath": "/{proxy+}" if request.path != "/" else "/",
            "stage": "local",
            "requestId": str(uuid.uuid4()),
            "extendedRequestId": str(uuid.uuid4()),
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "requestTimeEpoch": int(now * 1000),
            "httpMethod": request.method,
            "path": request.path,
            "protocol": request.environ.get("SERVER_PROTOCOL", "HTTP/1.1"),
            "identity": {"sourceIp": request.remote_addr or "127.0.0.1", "userAgent": request.user_agent.string,
                         "accountId": None, "caller": None, "user": None, "userArn": None,
                         "accessKey": None, "cognitoIdentityPoolId": None, "cognitoIdentityId": None,
                         "cognitoAuthenticationProvider": None, "cognitoAuthenticationType": None},
            "domainName": request.host,
        },
        "body": body or None,
        "isBase64Encoded": False,
    }


def _application(environ: dict[str, Any], start_response: Any) -> Any:
    from kiln.handlers.api import handler

    request = Request(environ)
    started = time.perf_counter()
    event = proxy_event(request)
    with _ONE_REQUEST_AT_A_TIME:
        result = handler(event, _Context())
    headers: dict[str, str] = {}
    for key, values in (result.get("multiValueHeaders") or {}).items():
        headers[key] = ", ".join(values)
    headers.update(result.get("headers") or {})
    response = Response(result.get("body") or "", status=result["statusCode"], headers=headers)
    target = request.headers.get("X-Amz-Target", "")
    log.info("%s %s%s -> %s (%.0f ms)", request.method, request.path, f" [{target}]" if target else "",
             result["statusCode"], (time.perf_counter() - started) * 1000)
    return response(environ, start_response)


class ApiServer:
    """The API on host:port (or on the listening socket ``fd``) in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, fd: int | None = None) -> None:
        self._mounts: dict[str, Any] = {}
        # HTTP/1.1 connections stay open between a client's calls (a new TCP connection and thread per call
        # cost ~1 ms of CPU here: bench/results/2026-12-01-load-s6.md)
        self._server: BaseWSGIServer = make_keepalive_server(host, port, self._dispatch, fd=fd)
        self.port = self._server.port
        if fd is not None:
            host = str(self._server.server_address[0])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-api", daemon=True)

    def mount(self, prefix: str, app: Any) -> ApiServer:
        """Serve another WSGI app (the web console) at ``prefix``; everything else is the API."""
        self._mounts[prefix] = app
        return self

    def _dispatch(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        for prefix, app in self._mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                return app(environ, start_response)
        return _application(environ, start_response)

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
