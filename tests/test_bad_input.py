"""Every bad input gets its documented answer (SPEC §4), and the gateway keeps serving."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import KEY, SUSPENDED_KEY, gateway_config
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc

CHAT_PATH = "/openai/chat/completions"
GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
NOT_FOUND_MSG = "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."
INVALID_MSG = "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."


@pytest.fixture(autouse=True)
def still_serving(gateway: GatewayProc) -> Iterator[None]:
    yield
    response = httpx.post(gateway.base + CHAT_PATH, json=GOOD, headers={"api-key": KEY})
    assert response.status_code == 200, "the gateway stopped serving after a bad input"


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert "x-request-id" in response.headers and "x-tollway-overhead-ms" in response.headers
    message: str = body["error"]["message"]
    return message


def _post(gateway: GatewayProc, content: bytes, path: str = CHAT_PATH) -> httpx.Response:
    return httpx.post(gateway.base + path, content=content,
                      headers={"api-key": KEY, "content-type": "application/json"})  # fmt: skip


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[]", "$: expected object, got array"),
        (b'{"messages": []}', "$: object missing required field model"),
        (b'{"model": 5, "messages": []}', "$.model: expected str, got int"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
         "$.messages[0].content: expected str, array or null, got int"),
        (b'{"model": "m", "messages": "hi"}', "$.messages: expected array, got str"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "$.stream: expected bool"),
        (b'{"model": "m", "messages": [], "max_tokens": "10"}', "$.max_tokens: expected int"),
    ],
)  # fmt: skip
def test_invalid_body_is_400_naming_the_field(
    gateway: GatewayProc, body: bytes, expected: str
) -> None:
    assert expected in _error(_post(gateway, body), 400, "InvalidRequest")


def test_invalid_embeddings_input(gateway: GatewayProc) -> None:
    response = _post(gateway, b'{"model": "e", "input": {"a": 1}}', "/openai/embeddings")
    assert "$.input" in _error(response, 400, "InvalidRequest")


def test_body_over_limit_is_413_before_it_is_read(gateway: GatewayProc) -> None:
    # Declare 50 MB, send none of it: the answer must come without the body.
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n"
            "content-type: application/json\r\ncontent-length: 50000000\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head.encode())
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"RequestTooLarge"' in reply


def test_chunked_body_over_limit_is_413(gateway: GatewayProc) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    response = httpx.post(gateway.base + CHAT_PATH, content=chunks(), headers={"api-key": KEY})
    _error(response, 413, "RequestTooLarge")


def test_missing_key(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + CHAT_PATH, json=GOOD)
    assert _error(response, 401, "SubscriptionKeyNotFound") == NOT_FOUND_MSG


@pytest.mark.parametrize("key", ["wrong-key-0123456789abcdef", SUSPENDED_KEY, KEY.upper()])
def test_invalid_or_suspended_key(gateway: GatewayProc, key: str) -> None:
    response = httpx.post(gateway.base + CHAT_PATH, json=GOOD, headers={"api-key": key})
    assert _error(response, 401, "SubscriptionKeyInvalid") == INVALID_MSG


def test_empty_query_key_is_missing(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + CHAT_PATH + "?subscription-key=", json=GOOD)
    _error(response, 401, "SubscriptionKeyNotFound")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/nowhere", 404, "OperationNotFound"),
        ("POST", "/openai/chat/completion", 404, "OperationNotFound"),
        ("POST", "/openai/assistants", 404, "OperationNotFound"),
        ("GET", "/openai/chat/completions", 405, "MethodNotAllowed"),
        ("DELETE", "/openai/models", 405, "MethodNotAllowed"),
        ("TRACE", "/passthrough/models", 405, "MethodNotAllowed"),
    ],
)
def test_unknown_path_and_wrong_verb(
    gateway: GatewayProc, method: str, path: str, status: int, code: str
) -> None:
    response = httpx.request(method, gateway.base + path, headers={"api-key": KEY})
    _error(response, status, code)
    if status == 405:
        assert response.headers["allow"]


@pytest.mark.parametrize(
    "path",
    [
        "/passthrough/../admin",
        "/passthrough/%2e%2e/secret",
        "/passthrough/..%2fsecret",
        "/passthrough/a/%2E%2e/%2e%2e/etc/passwd",
        "/passthrough/%252e%252e/x",
        "/passthrough/a\\..\\b",
        # path parameters: Tomcat and Jetty read `..;x` as the segment `..`
        "/passthrough/..;/admin",
        "/passthrough/a/..;jsessionid=x/b",
        "/passthrough/.;x/b",
        "/passthrough/%2e%2e;/x",
        "/passthrough/..%3b/x",
        "/passthrough/%2e%2e%3Bjsessionid=x/y",
        "/passthrough/%252e%252e%253b/x",
    ],
)
def test_passthrough_traversal_is_refused(gateway: GatewayProc, mock: MockProc, path: str) -> None:
    mock.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n\r\n".encode())
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.1 404"), reply[:100]
    if ";" in path or "%3b" in path.lower():
        assert reply.startswith(b"HTTP/1.1 400") and b'"InvalidRequest"' in reply, reply[:100]
    assert mock.requests() == [], "a traversal attempt reached the backend"


@pytest.mark.parametrize("path", ["/passthrough/a;b/c", "/passthrough/...;x", "/passthrough/a..;x"])
def test_passthrough_path_parameters_that_stay_put_are_forwarded(
    gateway: GatewayProc, mock: MockProc, path: str
) -> None:
    mock.clear()
    response = httpx.get(gateway.base + path, headers={"api-key": KEY})
    assert response.status_code == 404  # the mock's own answer
    (seen,) = mock.requests()
    assert seen["path"] == "/v1/" + path.removeprefix("/passthrough/")


@pytest.mark.parametrize("path", ["//evil.example/x", "/http://evil.example/x", "/@evil.example"])
def test_passthrough_host_tricks_stay_on_the_backend(
    gateway: GatewayProc, mock: MockProc, path: str
) -> None:
    mock.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            f"GET /passthrough{path} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n\r\n".encode()
        )
        sock.recv(65536)
    (seen,) = mock.requests()
    assert seen["path"].startswith("/v1/")  # under the backend's base path, on the backend


@pytest.mark.parametrize("value", [b"a\rb", b"a\r\rb", b"a\x00b", b"a\x7fb"])
def test_control_characters_in_header_values(
    gateway: GatewayProc, mock: MockProc, value: bytes
) -> None:
    mock.clear()
    request = (b"GET /passthrough/models HTTP/1.1\r\nhost: x\r\napi-key: " + KEY.encode()
               + b"\r\nx-custom: " + value + b"\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(request)
        reply = sock.recv(65536)
    for record in mock.requests():
        assert all(
            "\r" not in v and "\n" not in v and "\x00" not in v for _, v in record["headers"]
        )
    assert reply.startswith(b"HTTP/1.1 ")


def test_request_id_with_unsafe_characters_is_replaced(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + CHAT_PATH, json=GOOD,
                          headers={"api-key": KEY, "x-request-id": "bad id <script>"})  # fmt: skip
    assert response.headers["x-request-id"] != "bad id <script>"
    ok = httpx.post(
        gateway.base + CHAT_PATH, json=GOOD, headers={"api-key": KEY, "x-request-id": "abc-123"}
    )
    assert ok.headers["x-request-id"] == "abc-123"


def test_oversized_headers_are_refused(gateway: GatewayProc) -> None:
    huge = "x" * (1024 * 1024)
    try:
        response = httpx.post(
            gateway.base + CHAT_PATH, json=GOOD, headers={"api-key": KEY, "x-huge": huge}
        )
    except httpx.TransportError:
        return  # the server closed the connection on it: refused
    assert response.status_code in (400, 413, 431)


def test_slow_client_does_not_block_others(gateway: GatewayProc) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "slow"}]}'
    result: dict[str, bytes] = {}

    def trickle() -> None:
        head = (f"POST {CHAT_PATH} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")  # fmt: skip
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(head.encode())
            for i in range(0, len(body), 8):
                sock.sendall(body[i : i + 8])
                time.sleep(0.1)
            result["reply"] = sock.recv(65536)

    slow = threading.Thread(target=trickle)
    slow.start()
    served_meanwhile = 0
    while slow.is_alive():
        response = httpx.post(gateway.base + CHAT_PATH, json=GOOD, headers={"api-key": KEY})
        served_meanwhile += response.status_code == 200
    slow.join()
    assert served_meanwhile > 5
    assert result["reply"].startswith(b"HTTP/1.1 200")


def test_backend_refused_is_502_without_its_address(gateway: GatewayProc) -> None:
    response = httpx.post(
        gateway.base + "/dead/chat/completions", json=GOOD, headers={"api-key": KEY}
    )
    message = _error(response, 502, "BackendConnectionFailure")
    assert "127.0.0.1" not in response.text and "Connect" not in message


def test_backend_reset_before_headers_is_502(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + CHAT_PATH, json={**GOOD},
                          headers={"api-key": KEY, "x-mock-close-after": "0"})  # fmt: skip
    _error(response, 502, "BackendConnectionFailure")


def test_backend_timeout_is_504(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + CHAT_PATH, json=GOOD, timeout=10,
                          headers={"api-key": KEY, "x-mock-delay-ms": "4000"})  # fmt: skip
    _error(response, 504, "BackendTimeout")


def _raw_reply(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` on a fresh connection; the reply's status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.partition(b":")[2])
    return 0


@pytest.mark.parametrize("path", [CHAT_PATH, "/passthrough/upload"])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nabc\r\n0\r\n\r\n", id="bad-size-line"),
        pytest.param(b"-1\r\n", id="negative-size"),
        pytest.param(b"5\r\n{\"a\":\r\nQQ\r\n", id="good-then-bad-size"),
        pytest.param(b"3\r\n{\"a\": 1}\r\n0\r\n\r\n", id="chunk-longer-than-its-size"),
    ],
)  # fmt: skip
def test_malformed_chunked_body_is_400(gateway: GatewayProc, path: str, body: bytes) -> None:
    # Granian reports a body it cannot parse as `http.disconnect` with the client still
    # waiting; the client gets the documented error, not Granian's plain-text 500.
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\nx-request-id: chunky-1\r\n"
            "content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")  # fmt: skip
    status, headers, reply = _raw_reply(gateway.port, head.encode() + body)
    assert status == 400, reply
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "chunky-1" and "x-tollway-overhead-ms" in headers
    error = json.loads(reply)["error"]
    assert error["code"] == "InvalidRequest" and "malformed" in error["message"]


ADMIN_KEY = "admin-key-for-bad-input-0123456789"


@pytest.fixture(scope="module")
def sections(mock: MockProc) -> Iterator[GatewayProc]:
    """The test gateway with the console and the admin API on."""
    text = gateway_config(mock.url).replace("gateway:\n", f"gateway:\n  admin-key: {ADMIN_KEY}\n")
    proc = start_gateway(text)
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/healthz", {}, 200),
        ("HEAD", "/healthz", {}, 200),
        ("GET", "/readyz", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/openapi.json", {}, 200),
        ("POST", "/healthz", {}, 405),
        ("DELETE", "/metrics", {}, 405),
        ("GET", "/console", {}, 200),
        ("GET", "/console/nothing-here", {}, 404),
        ("GET", "/admin/subscriptions", {}, 401),
        ("GET", "/admin/subscriptions", {"authorization": f"Bearer {ADMIN_KEY}"}, 200),
        ("GET", "/admin/nothing-here", {"authorization": f"Bearer {ADMIN_KEY}"}, 404),
        ("GET", "/nowhere", {}, 404),
    ],
)
def test_every_response_carries_the_request_id_and_the_overhead(
    sections: GatewayProc, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    kept = httpx.request(method, sections.base + path, headers={**headers, "x-request-id": "own-1"})
    assert kept.status_code == status, kept.text
    assert kept.headers["x-request-id"] == "own-1"
    assert float(kept.headers["x-tollway-overhead-ms"]) >= 0
    assert len(kept.headers.get_list("x-request-id")) == 1
    made = httpx.request(method, sections.base + path, headers={**headers, "x-request-id": "a b"})
    assert made.status_code == status
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert "x-tollway-overhead-ms" in made.headers
