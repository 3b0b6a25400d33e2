"""HTTP/1.1 keep-alive on local mode's werkzeug servers (``kiln.local.keepalive``, ADR 0037): a
connection carries the next request only once this one is framed; anything unframed closes."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from kiln.local.keepalive import make_keepalive_server


def _app(environ: dict[str, Any], start_response: Any) -> Any:
    """Echoes what the server saw; ``/skip-body`` leaves the body unread, ``/fail`` fails mid-response."""
    path = environ["PATH_INFO"]
    body = b"" if path == "/skip-body" else environ["wsgi.input"].read()
    reply = json.dumps({"port": environ["REMOTE_PORT"], "body": body.decode(), "path": path}).encode()
    if path == "/fail":
        start_response("200 OK", [("Content-Length", "100")])

        def broken() -> Iterator[bytes]:
            yield b"partial"
            raise RuntimeError("the app failed mid-response")

        return broken()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(reply)))])
    return [reply]


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    import threading

    served = make_keepalive_server("127.0.0.1", 0, _app)
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield served
    served.shutdown()
    served.server_close()


def _connection(server: Any) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)


def _call(connection: http.client.HTTPConnection, path: str, body: bytes = b"",
          headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, dict[str, Any]]:
    connection.request("POST", path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response, json.loads(response.read())


def test_one_connection_carries_many_requests(server: Any) -> None:
    # GIVEN one HTTP/1.1 connection
    connection = _connection(server)
    # WHEN three requests with bodies go over it
    replies = [_call(connection, "/echo", f"body-{i}".encode()) for i in range(3)]
    # THEN each gets its own body back, from the same client port (one TCP connection), none says close
    assert [reply["body"] for _, reply in replies] == ["body-0", "body-1", "body-2"]
    assert len({reply["port"] for _, reply in replies}) == 1
    assert all(response.getheader("Connection") != "close" for response, _ in replies)
    connection.close()


def test_a_body_the_app_left_unread_is_drained_not_parsed_as_the_next_request(server: Any) -> None:
    # GIVEN a request whose body the app never reads (it looks like a request line)
    connection = _connection(server)
    first, _ = _call(connection, "/skip-body", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    # WHEN the next request follows on the same connection
    second, reply = _call(connection, "/echo", b"next")
    # THEN it is answered as itself, on the same connection
    assert first.status == 200 and second.status == 200
    assert reply["path"] == "/echo" and reply["body"] == "next"
    connection.close()


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes its end: reads reach EOF (not a 5 s silence) after the answer's rest."""
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize(("request_bytes", "why"), [
    (b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi", "HTTP/1.0"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", "client asked"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", "chunked body"),
    (b"POST /fail HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "app failed"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
])
def test_unframed_or_unwanted_keep_alive_closes_the_connection(server: Any, request_bytes: bytes, why: str) -> None:
    # GIVEN a request that cannot (or must not) be followed by another on its connection
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        # WHEN the server has answered it
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        # THEN it answered, and then closed the connection (as werkzeug does for every request)
        assert answer.startswith(b"HTTP/1."), why
        assert _closed_by_server(sock), why


def test_the_embedded_stack_keeps_connections(local_stack: Any) -> None:
    # GIVEN one connection to the embedded stack's endpoint (moto's app, as botocore's pool keeps them)
    host, port = local_stack.endpoint_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "DynamoDB_20120810.ListTables",
               "Authorization": "AWS4-HMAC-SHA256 Credential=local/20261201/us-east-1/dynamodb/aws4_request, "
                                "SignedHeaders=host, Signature=0"}
    # WHEN two DynamoDB calls go over it
    statuses, tables = [], []
    for _ in range(2):
        connection.request("POST", "/", body=b"{}", headers=headers)
        response = connection.getresponse()
        statuses.append(response.status)
        tables.append(json.loads(response.read())["TableNames"])
        # THEN neither closes it
        assert response.getheader("Connection") != "close"
    assert statuses == [200, 200] and "kiln-jobs" in tables[0] and tables[0] == tables[1]
    connection.close()
