"""The security table: each attack against a real `tollway serve`, judged by what the backend
actually received (SPEC §4).

Two backends watch. The session's mock LLM (`GET /_mock/requests`) is the ordinary one. For
request framing the mock cannot tell a complete request from a cut one (it reads Granian's
`http.disconnect` as the end of the body), so `WireBackend` below, a strict HTTP/1.1 origin,
records every request exactly as it came off the wire, flags any malformed line or ambiguous
framing, and answers `/early` targets before reading their body, as nginx does for `return`.
Attacks go over raw sockets wherever an HTTP client would normalise them away.

| row | attack | test |
|---|---|---|
| SSRF, traversal | `%00`, overlong UTF-8, triple encoding, mixed `.%2e`, `%5c`, `%2f%2f`, `@`, scheme in path | `test_passthrough_path_never_leaves_the_backend` |
| | absolute-form `GET http://evil/ HTTP/1.1`, userinfo, `CONNECT`, `OPTIONS *`, `Host: evil` | `test_passthrough_path_never_leaves_the_backend` |
| | `..`, `%2e%2e`, `..%2f`, `%252e`, `\\`; `//evil`, `http://evil`, `@evil` | test_bad_input.py `test_passthrough_traversal_is_refused`, `..._host_tricks_stay_on_the_backend`; test_routing.py `test_confine_*` |
| | path parameters: `..;x`, `.;x`, `%2e%2e;`, `..%3b` (Tomcat's `..`) | test_bad_input.py `test_passthrough_traversal_is_refused` |
| smuggling | CL+TE either order, two CLs, `TE: chunked, identity`, `TE: identity`, obs-fold, chunk-size overflow, HTTP/1.0 + TE | `test_smuggling_never_reaches_the_backend` |
| | a backend that answers before the body ends (nginx `return 403`) | `test_early_answer_never_lets_another_request_into_the_body` |
| | a malformed chunked body (bad size line, size mismatch): 400 JSON, not Granian's 500 | test_bad_input.py `test_malformed_chunked_body_is_400` |
| CR/LF | bare CR, NUL, obs-fold, `%0d%0a`, U+010D U+010A, U+2028 in x-request-id, traceparent, query, path, headers | `test_crlf_never_splits_a_backend_line` |
| | CR/LF in the path vs the access log (json; text) | `test_crlf_in_the_path_never_splits_an_access_log_line` |
| | bare CR / NUL / DEL in a header; unsafe x-request-id | test_bad_input.py `test_control_characters_in_header_values`, `test_request_id_with_unsafe_characters_is_replaced` |
| keys | stripped from the backend request (each source, both API types, error paths) | `test_subscription_keys_never_reach_the_backend` |
| | a valid key sent in a second source as well | `test_key_in_a_second_source_never_reaches_the_backend`, `test_bearer_key_never_reaches_a_backend_with_its_own_credential_header` |
| | error bodies and response headers | `test_subscription_keys_never_reach_the_client` |
| | gateway stdout/stderr | `test_subscription_keys_never_reach_the_gateway_log` |
| | /metrics | `test_subscription_keys_never_reach_metrics` |
| | backend credential to the client, also in backend error pass-through | `test_backend_credential_never_reaches_the_client` |
| | happy paths | test_passthrough.py `test_client_credentials_are_not_forwarded`, `test_key_from_query_is_removed_other_params_kept`, `test_access_log_holds_no_secrets`, `test_backend_credentials_never_reach_the_client`; test_telemetry_e2e.py `test_no_key_or_backend_secret_leaves_in_telemetry` |
| constant time | lookup by SHA-256 digest, one `hmac.compare_digest`, whatever prefix matches | `test_keys_are_looked_up_by_digest_only`, `test_near_miss_keys_are_refused_like_any_other` |
| admin | `/admin/*` without, with a wrong, with a subscription key | `test_admin_is_refused_and_never_reaches_a_backend` |
| oversize | 101+ headers, a 1 MiB header, a 100 kB URL | `test_oversized_head_is_refused` |
| | Content-Length over the limit (passthrough) | `test_declared_body_over_the_limit_is_refused_unread` |
| | chunked over the limit (passthrough) | `test_chunked_body_over_the_limit_never_completes_at_the_backend` |
| | a slowly dripped body over the limit (openai) | `test_dripped_body_over_the_limit_is_refused` |
| | over the limit (openai): declared / chunked; a 1 MiB header | test_bad_input.py `test_body_over_limit_is_413_before_it_is_read`, `test_chunked_body_over_limit_is_413`, `test_oversized_headers_are_refused` |
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
import pytest

from proxy import auth
from proxy import config as config_module
from tests.conftest import BACKEND_SECRET, KEY, KEY_B, SUSPENDED_KEY, gateway_config
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc, free_port

K = KEY.encode()
WIRE_SECRET = "wire-backend-secret-never-shown"
NEAR_MISSES = (KEY[:-1] + "X", KEY[:-1], KEY + "0", "X" + KEY[1:])
CLIENT_SECRETS = (KEY, KEY_B, SUSPENDED_KEY, *NEAR_MISSES)
BACKEND_SECRETS = (BACKEND_SECRET, BACKEND_SECRET.split()[1], WIRE_SECRET)
CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
GOOD_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# -- raw HTTP/1.1 on the client side


def _http(method: bytes, target: bytes, headers: list[bytes], body: bytes = b"") -> bytes:
    """One request as bytes, closing the connection after it (so a read ends at EOF)."""
    framed = any(h.lower().startswith((b"content-length", b"transfer-encoding")) for h in headers)
    if body and not framed:
        headers = [*headers, b"content-length: %d" % len(body)]
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"%b %b HTTP/1.1\r\nhost: tollway.test\r\n%bconnection: close\r\n\r\n%b" % (
        method, target, lines, body,
    )  # fmt: skip


def _exchange(port: int, data: bytes, *, quiet: float = 5.0) -> bytes:
    """Write `data`, return what comes back until the gateway closes or is quiet `quiet` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=quiet) as sock:
        # It may answer and close before taking everything: read the answer then.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


class Reply(NamedTuple):
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def _reply(raw: bytes) -> Reply:
    """The first response in `raw` (status 0 when there is none)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 "):
        return Reply(0, {}, b"")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        rest = rest[: int(headers[b"content-length"])]
    return Reply(int(lines[0].split()[1]), headers, rest)


def _gateway_error(reply: Reply, status: int | tuple[int, ...], *codes: str) -> None:
    """A gateway error in the documented shape, `{"error": {"message", "type", "code"}}`."""
    assert reply.status in (status if isinstance(status, tuple) else (status,)), reply
    assert reply.headers[b"content-type"] == b"application/json", reply
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] in codes, reply


def _healthy(gw: GatewayProc) -> None:
    assert httpx.get(gw.base + "/healthz", timeout=5).status_code == 200


def _wait(predicate: Callable[[], object], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- a strict origin that records the wire


@dataclass
class WireRequest:
    """One request as the backend parsed it off the wire."""

    conn: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # lower-case names, in order
    body: bytearray = field(default_factory=bytearray)  # de-chunked; grows as it arrives
    complete: bool = False  # the whole body (by its framing) arrived

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/1\.1\r\n")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n\x00]*?)[ \t]*\r\n")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,8})\r\n")


class WireBackend:
    """A strict HTTP/1.1 origin on its own thread and event loop.

    Every request is recorded as it arrives (`requests`); a request line, header line or
    framing it cannot parse unambiguously goes to `malformed` and the connection is closed.
    A target containing `/early` is answered 403 as soon as its head is in; its body is then
    read to its end and thrown away on the kept-alive connection, as nginx does
    (ngx_http_discard_request_body). Anything else is answered `answer for <target>`.
    """

    def __init__(self) -> None:
        self.requests: list[WireRequest] = []
        self.malformed: list[bytes] = []
        self.closed: set[int] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._conns = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(5)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def clear(self) -> None:
        self.requests.clear()
        self.malformed.clear()

    def to(self, target: bytes) -> list[WireRequest]:
        return [r for r in self.requests if r.target == target]

    def ended(self, request: WireRequest) -> bool:
        return request.complete or request.conn in self.closed

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        self._writers.add(writer)
        try:
            while await self._one(conn, reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass
        finally:
            self.closed.add(conn)
            self._writers.discard(writer)
            writer.close()

    async def _one(
        self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        line = await reader.readline()
        if not line:
            return False
        if (start := _REQUEST_LINE.fullmatch(line)) is None:
            self.malformed.append(line)
            return False
        headers = []
        while (line := await reader.readline()) != b"\r\n":
            if (match := _HEADER.fullmatch(line)) is None:
                self.malformed.append(line)
                return False
            headers.append((match[1].lower(), match[2]))
        request = WireRequest(conn, start[1], start[2], headers)
        self.requests.append(request)
        lengths, codings = request.values(b"content-length"), request.values(b"transfer-encoding")
        if len(lengths) > 1 or (lengths and codings) or codings not in ([], [b"chunked"]):
            self.malformed.append(b"ambiguous framing: %r" % headers)
            return False
        early = b"/early" in request.target
        if early:
            await _answer(writer, 403, b"refused early")
        if codings:
            await _read_chunked(reader, request)
        elif lengths:
            await _read_exactly(reader, request, int(lengths[0]))
        request.complete = True
        if not early:
            await _answer(writer, 200, b"answer for " + request.target)
        return True


async def _answer(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    writer.write(b"HTTP/1.1 %d X\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b"
                 % (status, len(body), body))  # fmt: skip
    await writer.drain()


async def _read_exactly(reader: asyncio.StreamReader, request: WireRequest, size: int) -> None:
    while size:
        data = await reader.read(min(size, 65536))
        if not data:
            raise asyncio.IncompleteReadError(b"", size)
        request.body += data
        size -= len(data)


async def _read_chunked(reader: asyncio.StreamReader, request: WireRequest) -> None:
    while True:
        if (size := _CHUNK_SIZE.fullmatch(await reader.readline())) is None:
            raise ValueError("bad chunk size line")
        if not (n := int(size[1], 16)):
            break
        await _read_exactly(reader, request, n)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk without CRLF")
    if await reader.readline() != b"\r\n":  # the gateway never sends trailers
        raise ValueError("trailers")


@pytest.fixture(scope="module")
def wire() -> Iterator[WireBackend]:
    backend = WireBackend()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def edge(wire: WireBackend) -> Iterator[GatewayProc]:
    """A gateway in front of the wire backend: a 4 KiB body limit, an Azure-style backend
    credential (`api-key`), the text access log, and traces on (to a closed port), so the
    backend's traceparent is written by the gateway."""
    config = f"""
gateway:
  max-request-body: 4KiB
telemetry:
  access-log: text
  otlp-endpoint: http://127.0.0.1:{free_port()}
backends:
  - id: wire
    url: http://127.0.0.1:{wire.port}/v1
    credentials: {{header: api-key, value: "{WIRE_SECRET}"}}
    timeout: {{connect: 2s, read: 3s}}
apis:
  - id: edge
    path: /edge
    type: passthrough
    backend: wire
subscriptions:
  - id: team-a
    scope: all-apis
    primary-key: {KEY}
"""
    proc = start_gateway(config, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "200"})
    yield proc
    proc.stop()


# -- SSRF and traversal


def _confined(record: dict[str, Any], mock: MockProc) -> None:
    path = record["path"]  # as the mock decoded it
    assert path.startswith("/v1/") and ".." not in path.split("/"), record
    assert dict(record["headers"])["host"] == f"127.0.0.1:{mock.port}", record


@pytest.mark.parametrize(
    ("request_line", "extra", "outcome"),
    [
        (b"GET /passthrough/%00 HTTP/1.1", b"", 400),
        (b"GET /passthrough/x%00.json HTTP/1.1", b"", 400),
        (b"GET /passthrough/%2e%2e%00/x HTTP/1.1", b"", 400),
        (b"GET /passthrough/%25252e%25252e/x HTTP/1.1", b"", 400),
        (b"GET /passthrough/.%2e/x HTTP/1.1", b"", 400),
        (b"GET /passthrough/%2E./x HTTP/1.1", b"", 400),
        (b"GET /passthrough/x/.. HTTP/1.1", b"", 400),
        (b"GET /passthrough/%2e%2e%2fx HTTP/1.1", b"", 400),
        (b"GET /passthrough/%5c..%5cx HTTP/1.1", b"", 400),
        (b"GET /passthrough/%09../x HTTP/1.1", b"", 400),
        (b"GET http://evil.example/ HTTP/1.1", b"", 404),
        (b"CONNECT evil.example:443 HTTP/1.1", b"", 404),
        (b"OPTIONS * HTTP/1.1", b"", 404),
        (b"GET /passthrough/%c0%ae%c0%ae/x HTTP/1.1", b"", "confined"),
        (b"GET /passthrough/%e0%80%ae%e0%80%ae/x HTTP/1.1", b"", "confined"),
        (b"GET /passthrough/..%c0%af..%c0%afx HTTP/1.1", b"", "confined"),
        (b"GET /passthrough/%2f%2fevil.example/x HTTP/1.1", b"", "confined"),
        (b"GET /passthrough/http:%2f%2fevil.example/x HTTP/1.1", b"", "confined"),
        (b"GET /passthrough/user:pw@evil.example:80/x HTTP/1.1", b"", "confined"),
        (b"GET http://evil.example/passthrough/models HTTP/1.1", b"", "confined"),
        (b"GET https://user:pw@evil.example:8443/passthrough/models?a=1 HTTP/1.1", b"", "confined"),
        (b"GET /passthrough/models HTTP/1.1", b"x-forwarded-host: evil.example\r\nforwarded: host=evil.example\r\n", "confined"),
    ],
)  # fmt: skip
def test_passthrough_path_never_leaves_the_backend(
    gateway: GatewayProc, mock: MockProc, request_line: bytes, extra: bytes, outcome: object
) -> None:
    mock.clear()
    # The Host header is the attacker's too: it must not pick the backend.
    raw = request_line + b"\r\nhost: evil.example\r\napi-key: " + K + b"\r\n" + extra
    reply = _reply(_exchange(gateway.port, raw + b"connection: close\r\n\r\n"))
    seen = mock.requests()
    if outcome == "confined":
        assert reply.status in (200, 404), reply  # the mock's own answer
        (record,) = seen
        _confined(record, mock)
    else:
        code = "InvalidRequest" if outcome == 400 else "OperationNotFound"
        _gateway_error(reply, outcome, code)  # type: ignore[arg-type]
        assert seen == [], "a refused path reached the backend"


# -- request smuggling


SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nhost: x\r\n\r\n"  # no key: pipelined, it is a 404


def _head(*lines: bytes) -> bytes:
    return b"POST /edge/upload HTTP/1.1\r\nhost: x\r\napi-key: " + K + b"\r\n" + b"".join(
        line + b"\r\n" for line in lines
    ) + b"\r\n"  # fmt: skip


HELLO = b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("payload", "outcome"),
    [
        pytest.param(_head(b"content-length: 4", b"transfer-encoding: chunked") + b"0\r\n\r\n" + SMUGGLED, b"", id="CL-then-TE"),
        pytest.param(_head(b"transfer-encoding: chunked", b"content-length: 4") + b"0\r\n\r\n" + SMUGGLED, b"", id="TE-then-CL"),
        pytest.param(_head(b"content-length: %d" % (len(HELLO) + len(SMUGGLED)), b"transfer-encoding: chunked") + HELLO + SMUGGLED, b"hello", id="CL-covers-smuggled"),
        pytest.param(_head(b"content-length: 5", b"content-length: %d" % (5 + len(SMUGGLED))) + b"hello" + SMUGGLED, 400, id="two-CLs"),
        pytest.param(_head(b"content-length: 5, %d" % (5 + len(SMUGGLED))) + b"hello" + SMUGGLED, 400, id="CL-list"),
        pytest.param(_head(b"transfer-encoding: chunked, identity") + HELLO + SMUGGLED, 400, id="TE-chunked-identity"),
        pytest.param(_head(b"transfer-encoding: identity", b"content-length: 5") + b"hello" + SMUGGLED, 400, id="TE-identity"),
        pytest.param(_head(b"transfer-encoding : chunked", b"content-length: 5") + b"hello" + SMUGGLED, 400, id="TE-space-before-colon"),
        pytest.param(_head(b"transfer-encoding: chunked", b"transfer-encoding: chunked") + HELLO + SMUGGLED, b"hello", id="TE-twice"),
        pytest.param(_head(b"x-fold: a", b" b", b"content-length: 5") + b"hello" + SMUGGLED, 400, id="obs-fold"),
        pytest.param(_head(b"transfer-encoding:", b" chunked", b"content-length: 5") + b"hello" + SMUGGLED, 400, id="obs-fold-TE"),
        pytest.param(_head(b"transfer-encoding: chunked") + b"ffffffffffffffffff1\r\nhello\r\n0\r\n\r\n" + SMUGGLED, "cut", id="chunk-size-overflow"),
        pytest.param(_head(b"transfer-encoding: chunked") + b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED, "cut", id="chunk-size-wraps-to-5"),
        pytest.param(_head(b"transfer-encoding: chunked") + b"5\nhello\n0\n\n" + SMUGGLED, "cut", id="chunk-bare-LF"),
        pytest.param(_head(b"transfer-encoding: chunked", b"content-length: 5").replace(b"HTTP/1.1", b"HTTP/1.0") + b"hello" + SMUGGLED, 400, id="HTTP/1.0-with-TE"),
    ],
)  # fmt: skip
def test_smuggling_never_reaches_the_backend(
    edge: GatewayProc, wire: WireBackend, payload: bytes, outcome: object
) -> None:
    """Refused with 400, or the backend sees exactly one complete, unambiguously framed
    request with the body the gateway decoded. "cut": the chunked body turns malformed after
    its head was streamed; the gateway must abort the backend request, never complete it, and
    answer 400 `InvalidRequest` (Granian reports the broken body as `http.disconnect`)."""
    wire.clear()
    reply = _reply(_exchange(edge.port, payload, quiet=0.5))
    _wait(lambda: all(wire.ended(r) for r in wire.requests), 1.0)
    assert not [r for r in wire.requests if b"smuggled" in r.target], "a smuggled request"
    assert wire.malformed == []
    uploads = wire.to(b"/v1/upload")
    if outcome == 400:
        assert reply.status == 400 and uploads == [], reply
    elif outcome == "cut":
        assert reply.status == 400 and not any(r.complete for r in uploads), reply
        assert json.loads(reply.body)["error"]["code"] == "InvalidRequest", reply
    else:
        (upload,) = uploads
        assert upload.complete and bytes(upload.body) == outcome
    _healthy(edge)


def test_early_answer_never_lets_another_request_into_the_body(
    edge: GatewayProc, wire: WireBackend
) -> None:
    wire.clear()
    budget = 600  # body bytes the attacker still owes after the first 10
    head = (b"POST /edge/early HTTP/1.1\r\nhost: x\r\napi-key: %b\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n") % (K, 10 + budget)  # fmt: skip
    victim: dict[str, bytes] = {}
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as attacker:
        attacker.sendall(head + b"y" * 10)
        assert _wait(lambda: wire.to(b"/v1/early"))
        (early,) = wire.to(b"/v1/early")  # answered 403 at once; its body is still coming
        # The 10 bytes reach the backend unless the gateway stopped forwarding the body when
        # the early answer came (a race either way is safe: it never reuses the connection).
        _wait(lambda: len(early.body) >= 10 or wire.ended(early))
        sent = len(early.body)
        request = _http(b"GET", b"/edge/victim", [b"api-key: " + K])
        thread = threading.Thread(target=lambda: victim.update(raw=_exchange(edge.port, request)))
        thread.start()
        # A broken pool writes the victim's request into the body the backend is reading.
        _wait(lambda: len(early.body) > sent or not thread.is_alive())
        time.sleep(0.1)
        absorbed = len(early.body) - sent
        tail = b"x" * budget
        smuggled = b"GET /internal/admin HTTP/1.1\r\nhost: x\r\nx-pad: "
        if absorbed >= len(smuggled) + 4:  # the backend will parse our last `absorbed` bytes
            smuggled += b"a" * (absorbed - len(smuggled) - 4) + b"\r\n\r\n"
            tail = b"x" * (budget - absorbed) + smuggled
        attacker.sendall(tail)
        assert _reply(_read_all(attacker)).status == 403
    thread.join(10)
    assert bytes(early.body) == (b"y" * 10 + tail)[: len(early.body)], (
        "another client's request (and the backend credential) inside this body: "
        + repr(bytes(early.body[sent : sent + max(absorbed, 0)]))
    )
    assert [r.target for r in wire.requests if not r.target.startswith(b"/v1/")] == []
    assert _reply(victim["raw"]).body == b"answer for /v1/victim"


# -- CR/LF injection


def _get(*headers: bytes, target: bytes = b"/edge/x") -> bytes:
    return _http(b"GET", target, [b"api-key: " + K, *headers])


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(_get(b"x-request-id: abc\rx-injected: 1"), id="request-id-bare-CR"),
        pytest.param(_get(b"x-request-id: abc\x00x-injected: 1"), id="request-id-NUL"),
        pytest.param(_get(b"x-request-id: abc", b" x-injected: 1"), id="request-id-obs-fold"),
        pytest.param(_get(b"x-request-id: abc%0d%0ax-injected:%201"), id="request-id-encoded-CRLF"),
        pytest.param(_get(b"x-request-id: abc\xc4\x8d\xc4\x8ax-injected: 1"), id="request-id-U+010D-U+010A"),
        pytest.param(_get(b"x-request-id: abc\xe2\x80\xa8x-injected: 1"), id="request-id-U+2028"),
        pytest.param(_get(b"traceparent: " + GOOD_TRACEPARENT + b"\rx-injected: 1"), id="traceparent-bare-CR"),
        pytest.param(_get(b"traceparent: " + GOOD_TRACEPARENT + b"%0d%0ax-injected: 1"), id="traceparent-encoded-CRLF"),
        pytest.param(_get(b"traceparent: 01" + GOOD_TRACEPARENT[2:] + b"-\xc4\x8d\xc4\x8ax-injected: 1"), id="traceparent-future-version-U+010D-U+010A"),
        pytest.param(_get(b"x-custom: a\xc4\x8d\xc4\x8ax-injected: 1\xe2\x80\xa8\x85"), id="header-obs-text"),
        pytest.param(_get(b"x-custom: a\x0bx-injected: 1"), id="header-VT"),
        pytest.param(_get(target=b"/edge/x?q=%0d%0ax-injected:%201"), id="query-encoded-CRLF"),
        pytest.param(_get(target=b"/edge/x?q=\rx-injected:1"), id="query-bare-CR"),
        pytest.param(_get(target=b"/edge/x?q=\xc4\x8d\xc4\x8a"), id="query-raw-UTF-8"),
        pytest.param(_get(target=b"/edge/x%0d%0ax-injected:%201"), id="path-encoded-CRLF"),
        pytest.param(_get(target=b"/edge/x\rx-injected:1"), id="path-bare-CR"),
    ],
)  # fmt: skip
def test_crlf_never_splits_a_backend_line(edge: GatewayProc, wire: WireBackend, raw: bytes) -> None:
    """Refused, or one request whose every line the strict backend parsed, with no injected
    header, a safe x-request-id and exactly one traceparent, made by the gateway."""
    wire.clear()
    reply = _reply(_exchange(edge.port, raw))
    assert reply.status in (200, 400), reply
    assert b"x-injected" not in reply.headers
    assert wire.malformed == []
    if reply.status == 400:  # by Granian, before the gateway runs, or by the gateway
        assert wire.requests == []
        return
    assert SAFE_REQUEST_ID.fullmatch(reply.headers[b"x-request-id"].decode("latin-1"))
    (request,) = wire.requests
    assert request.target.startswith(b"/v1/x")
    assert b"x-injected" not in dict(request.headers)
    (request_id,) = request.values(b"x-request-id")
    assert request_id == reply.headers[b"x-request-id"]
    (traceparent,) = request.values(b"traceparent")
    assert TRACEPARENT.fullmatch(traceparent.decode("latin-1"))


@pytest.mark.parametrize(
    "which",
    [
        "json",
        "text",
    ],
)  # fmt: skip
def test_crlf_in_the_path_never_splits_an_access_log_line(
    request: pytest.FixtureRequest, which: str
) -> None:
    gw: GatewayProc = request.getfixturevalue("gateway" if which == "json" else "edge")
    forged = b"FORGED%20127.0.0.1%20%22GET%20/admin%22%20200"  # decoded into the path
    for crlf in (b"%0d%0a", b"%0a"):
        reply = _reply(_exchange(gw.port, _http(b"GET", b"/nowhere" + crlf + forged, [])))
        _gateway_error(reply, 404, "OperationNotFound")
    assert _wait(lambda: gw.log().count("/nowhere") >= 2)  # the access log has both
    assert [line for line in gw.log().splitlines() if line.startswith("FORGED")] == []


# -- subscription keys and the backend credential


def _key_battery() -> list[tuple[str, bytes]]:
    """Requests holding keys (valid, near misses, suspended, out of scope) on every source
    and on the error paths: traversal, unknown path, wrong verb, too large, bad JSON, a
    malformed head, backend errors passed through, backend reset, a dead backend, a cut
    stream, /admin."""
    cases = []
    for key in (KEY, *NEAR_MISSES, SUSPENDED_KEY):
        k = key.encode()
        for path in (b"/openai/models", b"/passthrough/models"):
            cases += [
                ("ocp", _http(b"GET", path, [b"ocp-apim-subscription-key: " + k])),
                ("api-key", _http(b"GET", path, [b"api-key: " + k])),
                ("bearer", _http(b"GET", path, [b"authorization: Bearer " + k])),
                ("query", _http(b"GET", path + b"?x=1&subscription-key=" + k, [])),
            ]
    h = [b"api-key: " + K]
    post = b"/openai/chat/completions"
    stream = CHAT[:-1] + b', "stream": true}'
    cases += [
        ("out of scope", _http(b"GET", b"/passthrough/models", [b"api-key: " + KEY_B.encode()])),
        ("traversal", _http(b"GET", b"/passthrough/%2e%2e/x?subscription-key=" + K, [])),
        ("unknown", _http(b"GET", b"/nowhere?subscription-key=" + K, h)),
        ("wrong verb", _http(b"DELETE", b"/openai/models", h)),
        ("too large", _http(b"POST", post, [*h, b"content-length: 999999"])),
        ("bad json", _http(b"POST", post, h, b"{nope")),
        ("malformed head", _http(b"POST", post, [*h, b"x-fold: a", b" b"], CHAT)),
        ("backend 500", _http(b"GET", b"/passthrough/models", [*h, b"x-mock-status: 500"])),
        ("backend 401", _http(b"POST", post, [*h, b"x-mock-status: 401"], CHAT)),
        ("backend reset", _http(b"POST", post, [*h, b"x-mock-close-after: 0"], CHAT)),
        ("dead backend", _http(b"GET", b"/dead/models", h)),
        ("stream cut", _http(b"POST", post, [*h, b"x-mock-close-after: 2"], stream)),
        ("admin", _http(b"GET", b"/admin/keys?subscription-key=" + K, h)),
    ]
    return cases


class Battery(NamedTuple):
    replies: list[tuple[str, bytes]]
    backend: list[dict[str, Any]]


@pytest.fixture(scope="module")
def battery(gateway: GatewayProc, mock: MockProc) -> Battery:
    mock.clear()
    replies = [(name, _exchange(gateway.port, raw)) for name, raw in _key_battery()]
    statuses = {_reply(raw).status for _, raw in replies}
    # Every path the table claims was exercised (a gateway answering 404 to all proves nothing).
    assert {200, 400, 401, 404, 405, 413, 500, 502} <= statuses, statuses
    return Battery(replies, mock.requests())


def _leaks(text: str | bytes, secrets: tuple[str, ...]) -> list[str]:
    data = text.encode("latin-1", "replace") if isinstance(text, str) else text
    return [s for s in secrets if s.encode() in data]


def test_subscription_keys_never_reach_the_backend(battery: Battery) -> None:
    assert len(battery.backend) >= 8  # the valid key reached it from every source
    for record in battery.backend:
        assert _leaks(json.dumps(record), CLIENT_SECRETS) == [], record


def test_subscription_keys_never_reach_the_client(battery: Battery) -> None:
    for name, raw in battery.replies:
        assert _leaks(raw, CLIENT_SECRETS) == [], (name, raw)


def test_subscription_keys_never_reach_the_gateway_log(
    battery: Battery, gateway: GatewayProc
) -> None:
    assert _leaks(gateway.log(), CLIENT_SECRETS) == []


def test_subscription_keys_never_reach_metrics(battery: Battery, gateway: GatewayProc) -> None:
    scraped = httpx.get(gateway.base + "/metrics").text
    assert "tollway_requests" in scraped or "gen_ai" in scraped  # it did record the battery
    assert _leaks(scraped, CLIENT_SECRETS + BACKEND_SECRETS) == []


def test_backend_credential_never_reaches_the_client(battery: Battery) -> None:
    for name, raw in battery.replies:
        assert _leaks(raw, BACKEND_SECRETS) == [], (name, raw)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param(b"/passthrough/models?subscription-key=" + K, [b"api-key: " + K], id="api-key+query"),
        pytest.param(b"/openai/models?subscription-key=" + K, [b"authorization: Bearer " + K], id="bearer+query-openai"),
        pytest.param(b"/openai/models", [b"ocp-apim-subscription-key: " + K, b"api-key: " + K], id="ocp+api-key-openai"),
        pytest.param(b"/passthrough/models", [b"ocp-apim-subscription-key: " + K, b"api-key: " + K], id="ocp+api-key"),
        pytest.param(b"/passthrough/models", [b"ocp-apim-subscription-key: " + K, b"authorization: Bearer " + K], id="ocp+bearer"),
    ],
)  # fmt: skip
def test_key_in_a_second_source_never_reaches_the_backend(
    gateway: GatewayProc, mock: MockProc, path: bytes, headers: list[bytes]
) -> None:
    mock.clear()
    assert _reply(_exchange(gateway.port, _http(b"GET", path, headers))).status == 200
    (record,) = mock.requests()
    assert _leaks(json.dumps(record), (KEY,)) == [], record


def test_bearer_key_never_reaches_a_backend_with_its_own_credential_header(
    edge: GatewayProc, wire: WireBackend
) -> None:
    """The Azure case: the backend's credential is `api-key`, so a Bearer copy of the key
    is not overwritten by it."""
    wire.clear()
    headers = [b"ocp-apim-subscription-key: " + K, b"authorization: Bearer " + K]
    assert _reply(_exchange(edge.port, _http(b"GET", b"/edge/models", headers))).status == 200
    (request,) = wire.requests
    assert _leaks(repr(request.headers), (KEY,)) == [], request.headers


# -- constant-time key comparison


class _LookupRecorder(dict):  # type: ignore[type-arg]
    """The key ring's digest table, recording what it is asked for."""

    def __init__(self, table: dict[bytes, Any]) -> None:
        super().__init__(table)
        self.asked: list[bytes] = []

    def get(self, key: bytes, default: Any = None) -> Any:
        self.asked.append(key)
        return super().get(key, default)


def test_keys_are_looked_up_by_digest_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presented key is only ever hashed: the table lookup and the one comparison see
    its SHA-256 digest, so neither depends on how long a prefix of a real key it shares."""
    config = config_module.loads(gateway_config("http://127.0.0.1:9/v1"))
    ring = auth.KeyRing(config.subscriptions)
    assert all(len(d) == 32 for d in ring._by_digest)  # digests, not keys, are stored
    table = ring._by_digest = _LookupRecorder(ring._by_digest)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)  # what auth.py calls
    presented = [KEY, *NEAR_MISSES, KEY[:8], "z" * len(KEY), KEY_B]
    found = [ring.find(key.encode()) for key in presented]
    assert [s.id if s else None for s in found] == ["team-a", *[None] * 6, "team-b"]
    digests = [hashlib.sha256(key.encode()).digest() for key in presented]
    assert table.asked == digests  # one lookup each, by digest
    assert [b for _, b in compared] == digests  # one constant-time comparison each
    assert all(len(a) in (0, 32) for a, _ in compared)  # the stored digest, or nothing


@pytest.mark.parametrize("key", NEAR_MISSES)
def test_near_miss_keys_are_refused_like_any_other(
    gateway: GatewayProc, mock: MockProc, key: str
) -> None:
    mock.clear()
    path = b"/passthrough/models"
    wrong = _reply(_exchange(gateway.port, _http(b"GET", path, [b"api-key: " + key.encode()])))
    other = _reply(_exchange(gateway.port, _http(b"GET", path, [b"api-key: " + b"q" * len(key)])))
    _gateway_error(wrong, 401, "SubscriptionKeyInvalid")
    assert wrong.body == other.body
    assert mock.requests() == []


# -- admin endpoints


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        (b"GET", b"/admin", []),
        (b"GET", b"/admin/", []),
        (b"GET", b"/admin/subscriptions", []),
        (b"GET", b"/admin/subscriptions", [b"x-admin-key: wrong-admin-key-0123456789"]),
        (b"GET", b"/admin/subscriptions", [b"authorization: Bearer wrong-admin-key-0123456789"]),
        (b"GET", b"/admin/subscriptions", [b"api-key: " + K]),
        (b"POST", b"/admin/keys", [b"authorization: Bearer " + K, b"content-type: application/json"]),
        (b"DELETE", b"/admin/subscriptions/team-a", [b"api-key: " + K]),
        (b"GET", b"/admin%2fsubscriptions", [b"api-key: " + K]),
        (b"GET", b"/ADMIN/subscriptions", [b"api-key: " + K]),
        (b"GET", b"//admin/subscriptions", [b"api-key: " + K]),
    ],
)  # fmt: skip
def test_admin_is_refused_and_never_reaches_a_backend(
    gateway: GatewayProc, mock: MockProc, method: bytes, target: bytes, headers: list[bytes]
) -> None:
    mock.clear()
    body = b"{}" if method == b"POST" else b""
    reply = _reply(_exchange(gateway.port, _http(method, target, headers, body)))
    _gateway_error(reply, (401, 404), "OperationNotFound", "SubscriptionKeyNotFound",
                   "SubscriptionKeyInvalid")  # fmt: skip
    assert mock.requests() == []


# -- oversized requests


@pytest.mark.parametrize(
    ("raw", "statuses"),
    [
        pytest.param(_get(*(b"x-h%d: v" % i for i in range(200)), target=b"/passthrough/models"), (431,), id="200-headers"),
        pytest.param(_get(*(b"x-h%d: v" % i for i in range(5000)), target=b"/passthrough/models"), (431,), id="5000-headers"),
        pytest.param(_get(b"x-long: " + b"a" * (1 << 20), target=b"/passthrough/models"), (431, 0), id="1MiB-header"),
        pytest.param(_get(target=b"/passthrough/" + b"a" * 100_000), (414, 431), id="100kB-URL"),
    ],
)  # fmt: skip
def test_oversized_head_is_refused(
    gateway: GatewayProc, mock: MockProc, raw: bytes, statuses: tuple[int, ...]
) -> None:
    """Granian refuses these before the gateway runs (status 0: it closed on us)."""
    mock.clear()
    assert _reply(_exchange(gateway.port, raw)).status in statuses
    assert mock.requests() == []
    _healthy(gateway)


def test_declared_body_over_the_limit_is_refused_unread(
    gateway: GatewayProc, mock: MockProc
) -> None:
    mock.clear()
    head = _http(b"PUT", b"/passthrough/files/x", [b"api-key: " + K, b"content-length: 70000"])
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head)  # and none of the body: the answer must not wait for it
        reply = _reply(_read_all(sock))
    _gateway_error(reply, 413, "RequestTooLarge")
    assert mock.requests() == []
    _healthy(gateway)


def test_chunked_body_over_the_limit_never_completes_at_the_backend(
    edge: GatewayProc, wire: WireBackend
) -> None:
    """Passthrough streams bodies, so the head and up to the limit have gone ahead; the
    gateway must then cut the backend request off, never finish it."""
    wire.clear()
    chunks = b"".join(b"400\r\n" + b"z" * 1024 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"
    raw = _http(b"POST", b"/edge/upload", [b"api-key: " + K, b"transfer-encoding: chunked"])
    reply = _reply(_exchange(edge.port, raw + chunks))
    _gateway_error(reply, 413, "RequestTooLarge")
    assert _wait(lambda: all(wire.ended(r) for r in wire.requests))
    for request in wire.to(b"/v1/upload"):
        assert not request.complete and len(request.body) <= 4096
    _healthy(edge)


def test_dripped_body_over_the_limit_is_refused(gateway: GatewayProc, mock: MockProc) -> None:
    mock.clear()
    raw = _http(b"POST", b"/openai/chat/completions",
                [b"api-key: " + K, b"transfer-encoding: chunked"])  # fmt: skip
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(raw)
        try:
            for _ in range(20):  # 80 KiB over 0.4 s against a 64 KiB limit
                sock.sendall(b"1000\r\n" + b"z" * 4096 + b"\r\n")
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-drip and closed
        reply = _reply(_read_all(sock))
    _gateway_error(reply, 413, "RequestTooLarge")
    assert mock.requests() == []
    _healthy(gateway)
