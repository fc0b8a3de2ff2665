"""`proxy.http1`, the gateway's own HTTP/1.1 client, against real loopback servers.

Each backend here is a raw TCP server (`asyncio.start_server`) scripted by the test: it reads
the request head and body itself and answers with exact bytes, so framing, keep-alive and
failure cases are what the client really sees on the wire. No mocks.

Every test runs once under uvloop (what production uses) and once under asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy import http1
from proxy.errors import BackendConnectionError, BackendTimeoutError
from proxy.http1 import ConnectionPool
from tests.mockproc import free_port

Runner = Callable[[Coroutine[Any, Any, None]], None]

# pytest-timeout cannot interrupt a loop blocked in uvloop's epoll: each test guards itself.
GUARD = 20.0


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a test's coroutine to completion on a fresh event loop of the given kind."""
    runner = uvloop.run if request.param == "uvloop" else asyncio.run

    def run_guarded(main: Coroutine[Any, Any, None]) -> None:
        runner(asyncio.wait_for(main, GUARD))

    return run_guarded


# -- a scriptable loopback backend


@dataclass
class Request:
    """One request as the backend received it."""

    method: bytes
    target: bytes
    head: bytes  # request line and header lines exactly as received, up to the blank line
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes  # decoded when chunked
    chunk_sizes: list[int] | None  # the chunked framing as sent; None when not chunked


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request; None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    assert version == b"HTTP/1.1"
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep, line
        assert name.lower() not in headers, f"duplicate header {name!r}"
        headers[name.lower()] = value.strip()
    chunk_sizes: list[int] | None = None
    if b"content-length" in headers:
        assert b"transfer-encoding" not in headers
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        chunk_sizes, parts = [], []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                assert await reader.readexactly(2) == b"\r\n"  # no trailers
                break
            chunk_sizes.append(size)
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        body = b"".join(parts)
    else:
        body = b""
    return Request(method, target, head, headers, body, chunk_sizes)


Handler = Callable[["Backend", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Backend:
    """A raw TCP (or TLS) server on 127.0.0.1 whose every connection runs `handler`.

    It counts accepted connections and how many were open at once, records the requests
    its handler read with `read()`, and re-raises a handler's own failure on exit.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        rcvbuf: int | None = None,
    ):
        self.handler = handler
        self.ssl_context = ssl_context
        self.rcvbuf = rcvbuf
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self.ended: list[int] = []  # connections whose handler has returned, in order
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Backend:
        sock = socket.socket()
        if self.rcvbuf is not None:  # before listen(): accepted sockets inherit it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self.server = await asyncio.start_server(self._serve, sock=sock, ssl=self.ssl_context)
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()
        if exc_type is None and self.errors:
            raise self.errors[0]

    async def read(self, reader: asyncio.StreamReader) -> Request | None:
        request = await read_request(reader)
        if request is not None:
            self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.accepted += 1
        number = self.accepted
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(self, reader, writer, number)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: several tests make it do so
        except asyncio.CancelledError:
            pass  # torn down by __aexit__
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.open -= 1
            self.ended.append(number)
            writer.close()
            self._tasks.discard(task)


def reply(body: bytes = b"", status: int = 200, *headers: bytes) -> bytes:
    """A complete response framed by Content-Length."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 %d Whatever\r\n%bContent-Length: %d\r\n\r\n%b" % (
        status,
        extra,
        len(body),
        body,
    )


def answer(make: Callable[[Request], bytes], delay: float = 0.0) -> Handler:
    """A keep-alive handler answering each request with `make(request)`."""

    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        while (request := await backend.read(reader)) is not None:
            if delay:
                await asyncio.sleep(delay)
            writer.write(make(request))
            await writer.drain()

    return handler


async def hold(reader: asyncio.StreamReader) -> None:
    """Keep the connection open, discarding input, until the client closes it."""
    while await reader.read(65536):
        pass


@contextlib.asynccontextmanager
async def client(url: str, **options: Any) -> AsyncIterator[ConnectionPool]:
    # A hang becomes a BackendTimeoutError; still longer than `until` waits, so a connection
    # closed by the read timeout never passes for one the client closed by design.
    options.setdefault("read_timeout", 10.0)
    options.setdefault("connect_timeout", 10.0)
    pool = ConnectionPool(url, **options)
    try:
        yield pool
    finally:
        await pool.close()


async def until(predicate: Callable[[], bool], limit: float = 2.0) -> None:
    """Poll until `predicate()` holds; fail (rather than hang) after `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition never reached"
        await asyncio.sleep(0.005)


async def get(pool: ConnectionPool, target: bytes = b"/") -> tuple[int, bytes]:
    response = await pool.request(b"GET", target, b"")
    return response.status, await response.read()


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# -- 1. keep-alive


def test_sequential_requests_share_one_keep_alive_connection(run: Runner) -> None:
    async def main() -> None:
        handler = answer(lambda request: reply(b"hello " + request.target))
        async with Backend(handler) as backend, client(backend.url) as pool:
            for i in range(5):
                assert await get(pool, b"/%d" % i) == (200, b"hello /%d" % i)
            assert backend.accepted == 1
            assert pool.connections == 1
            assert [r.target for r in backend.requests] == [b"/%d" % i for i in range(5)]

    run(main())


def test_idle_connection_past_idle_timeout_is_not_reused(run: Runner) -> None:
    async def main() -> None:
        async with (
            Backend(answer(lambda _: reply(b"ok"))) as backend,
            client(backend.url, idle_timeout=0.1) as pool,
        ):
            assert await get(pool) == (200, b"ok")
            await asyncio.sleep(0.25)
            assert await get(pool) == (200, b"ok")
            assert backend.accepted == 2
            await until(lambda: pool.connections == 1)  # the expired one was closed

    run(main())


# -- 2. response framing


def test_content_length_body_and_headers(run: Runner) -> None:
    body = pattern(300_000)

    async def main() -> None:
        handler = answer(
            lambda _: reply(body, 201, b"Content-Type: Application/JSON; charset=utf-8")
        )
        async with Backend(handler) as backend, client(backend.url) as pool:
            response = await pool.request(b"GET", b"/", b"")
            assert response.status == 201
            assert response.headers[0] == (b"Content-Type", b"Application/JSON; charset=utf-8")
            assert response.header(b"content-length") == b"300000"
            assert response.header(b"x-missing") is None
            assert response.content_type == "application/json"
            assert await response.read() == body
            assert pool.connections == 1

    run(main())


CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n"
    b"1A;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b"1\r\n!\r\n"
    b"0\r\n\r\n"
)


def test_chunked_response_is_reassembled_and_the_connection_reused(run: Runner) -> None:
    async def main() -> None:
        async with (
            Backend(answer(lambda _: CHUNKED_RESPONSE)) as backend,
            client(backend.url) as pool,
        ):
            for _ in range(3):
                assert await get(pool) == (200, b"helloabcdefghijklmnopqrstuvwxyz!")
            assert backend.accepted == 1

    run(main())


def test_trailers_do_not_leak_into_the_next_response(run: Runner) -> None:
    with_trailer = CHUNKED_RESPONSE[:-2] + b"X-Trailer: t\r\n\r\n"

    async def main() -> None:
        responses = iter([with_trailer, reply(b"ok", 200, b"X-Next: n")])
        async with (
            Backend(answer(lambda _: next(responses))) as backend,
            client(backend.url) as pool,
        ):
            first = await pool.request(b"GET", b"/", b"")
            assert await first.read() == b"helloabcdefghijklmnopqrstuvwxyz!"
            second = await pool.request(b"GET", b"/", b"")
            assert await second.read() == b"ok"
            assert second.headers == [(b"X-Next", b"n"), (b"Content-Length", b"2")]
            assert backend.accepted == 1

    run(main())


def test_body_delimited_by_close_is_read_to_the_end(run: Runner) -> None:
    part1, part2 = pattern(70_000, 1), pattern(90_000, 2)

    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + part1)
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(part2)
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url) as pool:
            assert await get(pool) == (200, part1 + part2)
            assert pool.connections == 0
            assert await get(pool) == (200, part1 + part2)
            assert backend.accepted == 2

    run(main())


# -- 3. streaming


def test_chunks_delivers_the_first_part_while_the_backend_holds_the_rest(
    run: Runner,
) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(
            backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
        ) -> None:
            await backend.read(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"5\r\nsecon\r\n2\r\nd\n\r\n0\r\n\r\n")
            await writer.drain()
            await hold(reader)

        async with Backend(handler) as backend, client(backend.url, read_timeout=2.0) as pool:
            response = await pool.request(b"GET", b"/stream", b"")
            received = []
            async for chunk in response.chunks():
                received.append(chunk)
                release.set()  # only once the first part is in our hands
            assert received[0] == b"first\n"
            assert b"".join(received) == b"first\nsecond\n"
            assert pool.connections == 1

    run(main())


def test_chunks_read_to_the_end_return_the_connection(run: Runner) -> None:
    body = pattern(200_000)

    async def main() -> None:
        async with Backend(answer(lambda _: reply(body))) as backend, client(backend.url) as pool:
            response = await pool.request(b"GET", b"/", b"")
            assert b"".join([c async for c in response.chunks()]) == body
            assert await get(pool) == (200, body)
            assert backend.accepted == 1

    run(main())


# -- 4. broken backends


def _cut_short(framing: str) -> bytes:
    if framing == "content-length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("consume", ["read", "chunks"])
def test_backend_closing_mid_body_is_a_connection_error(
    run: Runner, framing: str, consume: str
) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(_cut_short(framing))
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url) as pool:
            response = await pool.request(b"GET", b"/", b"")
            assert response.status == 200
            received = []
            with pytest.raises(BackendConnectionError):
                if consume == "read":
                    await response.read()
                else:
                    async for chunk in response.chunks():
                        received.append(chunk)
            if consume == "chunks":
                assert b"".join(received) == b"x" * 100
            assert pool.connections == 0

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"],
    ids=["not-http", "bad-length"],
)
def test_garbage_from_the_backend_is_a_connection_error(run: Runner, garbage: bytes) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(garbage)
        await writer.drain()
        await hold(reader)  # keeps the connection open: the parser must notice by itself

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url) as pool:
            with pytest.raises(BackendConnectionError):
                await pool.request(b"GET", b"/", b"")
            await until(lambda: backend.ended == [1])  # and the client hung up

    run(main())


def test_unsolicited_bytes_after_a_response_drop_the_connection(run: Runner) -> None:
    smuggled = reply(b"ok") + reply(b"evil!")
    responses = iter([smuggled, reply(b"good")])

    async def main() -> None:
        async with (
            Backend(answer(lambda _: next(responses))) as backend,
            client(backend.url) as pool,
        ):
            assert await get(pool) == (200, b"ok")
            assert await get(pool) == (200, b"good")
            assert backend.accepted == 2

    run(main())


def test_connection_refused_is_a_connection_error(run: Runner) -> None:
    async def main() -> None:
        # A port that was free a moment ago: nothing listens there.
        async with client(f"http://127.0.0.1:{free_port()}") as pool:
            with pytest.raises(BackendConnectionError):
                await pool.request(b"GET", b"/", b"")
            assert pool.connections == 0

    run(main())


def test_closed_pool_refuses_requests(run: Runner) -> None:
    async def main() -> None:
        async with Backend(answer(lambda _: reply(b"ok"))) as backend:
            pool = ConnectionPool(backend.url)
            assert await get(pool) == (200, b"ok")
            await pool.close()
            assert pool.closed
            assert pool.connections == 0
            with pytest.raises(BackendConnectionError):
                await pool.request(b"GET", b"/", b"")
            await until(lambda: backend.ended == [1])

    run(main())


# -- 5. read timeouts


def test_backend_that_never_answers_times_out(run: Runner) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        await hold(reader)

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url, read_timeout=0.2) as pool:
            with pytest.raises(BackendTimeoutError):
                await pool.request(b"GET", b"/", b"")
            assert len(backend.requests) == 1
            await until(lambda: backend.ended == [1])  # the connection was dropped
            assert pool.connections == 0

    run(main())


def test_stream_stalling_mid_body_times_out(run: Runner) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 300)
        await writer.drain()
        await hold(reader)

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url, read_timeout=0.2) as pool:
            response = await pool.request(b"GET", b"/", b"")
            received = []
            with pytest.raises(BackendTimeoutError):
                async for chunk in response.chunks():
                    received.append(chunk)
            assert b"".join(received) == b"y" * 300
            await until(lambda: backend.ended == [1])

    run(main())


# -- 6. the pool's limit


def test_pool_limit_caps_simultaneous_connections(run: Runner) -> None:
    async def main() -> None:
        in_flight = peak = 0

        async def handler(
            backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
        ) -> None:
            nonlocal in_flight, peak
            while (request := await backend.read(reader)) is not None:
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.05)
                in_flight -= 1
                writer.write(reply(request.target))
                await writer.drain()

        async with Backend(handler) as backend, client(backend.url, limit=2) as pool:
            results = await asyncio.gather(*(get(pool, b"/%d" % i) for i in range(6)))
            assert results == [(200, b"/%d" % i) for i in range(6)]
            assert backend.max_open == 2
            assert backend.accepted == 2
            assert peak == 2
            assert pool.connections == 2

    run(main())


def test_cancelled_waiter_passes_its_wake_up_on(run: Runner) -> None:
    """A request woken for a free connection but cancelled before taking it must not strand
    the next waiter (limit=1: B is woken when A's response ends, and cancelled at once)."""

    async def main() -> None:
        release = asyncio.Event()

        async def handler(
            backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
        ) -> None:
            while (request := await backend.read(reader)) is not None:
                if request.target == b"/a":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
                    await writer.drain()
                    await release.wait()
                    writer.write(b"a")
                else:
                    writer.write(reply(request.target))
                await writer.drain()

        async with Backend(handler) as backend, client(backend.url, limit=1) as pool:
            a = await pool.request(b"GET", b"/a", b"")
            b = asyncio.create_task(get(pool, b"/b"))
            c = asyncio.create_task(get(pool, b"/c"))
            await until(lambda: len(pool._waiters) == 2)
            release.set()
            assert await a.read() == b"a"  # wakes this task, then B (the connection is free)
            b.cancel()  # B has been woken but has not run yet
            with pytest.raises(asyncio.CancelledError):
                await b
            assert await asyncio.wait_for(c, 3) == (200, b"/c")
            assert [r.target for r in backend.requests] == [b"/a", b"/c"]

    run(main())


# -- 7. request bodies and heads


def test_bytes_body_is_sent_with_content_length(run: Runner) -> None:
    body = pattern(50_000)  # beyond the size sent together with the head

    async def main() -> None:
        handler = answer(lambda r: reply(hashlib.sha256(r.body).hexdigest().encode()))
        async with Backend(handler) as backend, client(backend.url) as pool:
            for payload in (b'{"small": true}', body):
                response = await pool.request(b"POST", b"/v1/x", b"", payload)
                assert await response.read() == hashlib.sha256(payload).hexdigest().encode()
            small, large = backend.requests
            assert small.headers[b"content-length"] == b"15"
            assert small.body == b'{"small": true}'
            assert large.headers[b"content-length"] == b"50000"
            assert large.body == body
            assert b"transfer-encoding" not in large.headers

    run(main())


def test_requests_without_a_body(run: Runner) -> None:
    async def main() -> None:
        async with Backend(answer(lambda _: reply())) as backend, client(backend.url) as pool:
            for method in (b"GET", b"POST", b"DELETE"):
                await (await pool.request(method, b"/", b"")).read()
            get_, post, delete = backend.requests
            assert b"content-length" not in get_.headers
            assert b"transfer-encoding" not in get_.headers
            assert post.headers[b"content-length"] == b"0"
            assert b"content-length" not in delete.headers
            assert backend.accepted == 1

    run(main())


async def _parts(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


PARTS = [b"alpha,", b"", b"beta" * 1000, b",gamma"]


def test_stream_body_with_length_is_sent_with_content_length(run: Runner) -> None:
    async def main() -> None:
        async with Backend(answer(lambda _: reply(b"ok"))) as backend, client(backend.url) as pool:
            total = sum(map(len, PARTS))
            response = await pool.request(b"PUT", b"/", b"", _parts(PARTS), length=total)
            assert await response.read() == b"ok"
            (request,) = backend.requests
            assert request.headers[b"content-length"] == str(total).encode()
            assert b"transfer-encoding" not in request.headers
            assert request.body == b"".join(PARTS)

    run(main())


def test_stream_body_without_length_is_sent_chunked(run: Runner) -> None:
    async def main() -> None:
        async with Backend(answer(lambda _: reply(b"ok"))) as backend, client(backend.url) as pool:
            response = await pool.request(b"POST", b"/", b"", _parts(PARTS))
            assert await response.read() == b"ok"
            # The connection is still in step: the terminating chunk was sent exactly once.
            assert await get(pool) == (200, b"ok")
            request = backend.requests[0]
            assert request.headers[b"transfer-encoding"] == b"chunked"
            assert b"content-length" not in request.headers
            assert request.body == b"".join(PARTS)
            # An empty part is not sent: as a chunk it would end the body early.
            assert request.chunk_sizes == [len(p) for p in PARTS if p]
            assert backend.accepted == 1

    run(main())


def test_head_is_sent_verbatim_with_host(run: Runner) -> None:
    headers = b"X-Trace-Id: AbC-1\r\nauthorization: Bearer t0k3n\r\n"
    assert headers == b"X-Trace-Id: AbC-1\r\nauthorization: Bearer t0k3n\r\n"

    async def main() -> None:
        async with Backend(answer(lambda _: reply(b"ok"))) as backend, client(backend.url) as pool:
            response = await pool.request(b"POST", b"/v1/chat?x=1&y=%20", headers, b"{}")
            assert await response.read() == b"ok"
            (request,) = backend.requests
            assert request.head == (
                b"POST /v1/chat?x=1&y=%%20 HTTP/1.1\r\n"
                b"host: 127.0.0.1:%d\r\n"
                b"X-Trace-Id: AbC-1\r\nauthorization: Bearer t0k3n\r\n"
                b"content-length: 2\r\n\r\n" % backend.port
            )

    run(main())


@pytest.mark.parametrize(
    ("url", "authority", "port"),
    [
        ("http://example.com/v1", b"example.com", 80),
        ("https://example.com:443", b"example.com", 443),
        ("https://example.com", b"example.com", 443),
        ("http://example.com:443", b"example.com:443", 443),
        ("http://10.0.0.1:8080/x", b"10.0.0.1:8080", 8080),
        ("http://[::1]:8443", b"[::1]:8443", 8443),
    ],
)
def test_pool_authority(run: Runner, url: str, authority: bytes, port: int) -> None:
    async def main() -> None:
        pool = ConnectionPool(url)
        assert (pool.authority, pool.port) == (authority, port)
        assert (pool.ssl is not None) == url.startswith("https")
        await pool.close()

    run(main())


def test_pool_rejects_non_http_urls(run: Runner) -> None:
    async def main() -> None:
        for url in ("ftp://example.com", "http://", "example.com"):
            with pytest.raises(ValueError):
                ConnectionPool(url)

    run(main())


# -- 8. cancellation


def test_cancelled_request_drops_its_connection(run: Runner) -> None:
    async def main() -> None:
        waiting = asyncio.Event()

        async def handler(
            backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
        ) -> None:
            while (request := await backend.read(reader)) is not None:
                if request.target == b"/hang":
                    waiting.set()
                    await hold(reader)
                    return
                writer.write(reply(b"fine"))
                await writer.drain()

        async with Backend(handler) as backend, client(backend.url) as pool:
            task = asyncio.create_task(get(pool, b"/hang"))
            await waiting.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: backend.ended == [1])  # the backend saw it go away
            assert await get(pool) == (200, b"fine")
            assert backend.accepted == 2
            assert pool.connections == 1

    run(main())


def test_a_request_cancelled_after_its_response_came_leaves_the_connection_alone(
    run: Runner,
) -> None:
    """A request cancelled after its response arrived and its connection went back to the
    pool, but before its task ran again, must not drop that connection: another request
    may already be on it. (Under load, many callbacks run in one loop turn: the gateway's
    bench saw 502s this way, `BackendConnectionFailure` with nothing received.)"""

    async def main() -> None:
        async with (
            Backend(answer(lambda r: reply(r.target))) as backend,
            client(backend.url) as pool,
        ):
            first = asyncio.create_task(get(pool, b"/first"))

            async def second() -> tuple[int, bytes]:
                while not pool._idle:  # queued ahead of `first`'s wake-up every loop turn
                    await asyncio.sleep(0)
                first.cancel()  # its response came; it has not run since
                return await get(pool, b"/second")  # on the connection `first` released

            assert await second() == (200, b"/second")
            with contextlib.suppress(asyncio.CancelledError):
                await first
            assert [r.target for r in backend.requests] == [b"/first", b"/second"]
            assert backend.accepted == 1
            assert await get(pool, b"/third") == (200, b"/third")  # still the same one
            assert backend.accepted == 1

    run(main())


# -- 9. stale keep-alive connections


def test_connection_the_backend_closed_while_idle_is_replaced(run: Runner) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(reply(b"once"))  # keep-alive by default, then closed as if idle too long
        await writer.drain()

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url) as pool:
            assert await get(pool) == (200, b"once")
            await until(lambda: pool.connections == 0)
            assert await get(pool) == (200, b"once")
            await until(lambda: pool.connections == 0)
            response = await pool.request(b"POST", b"/", b"", b"data")
            assert await response.read() == b"once"
            assert backend.accepted == 3
            assert [r.method for r in backend.requests] == [b"GET", b"GET", b"POST"]

    run(main())


def _closes_on_second_request() -> Handler:
    """Answers the first request of a connection; closes unanswered at the second (the race
    of a backend timing out an idle connection just as a request is sent on it)."""

    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(reply(b"ok"))
        await writer.drain()
        await backend.read(reader)

    return handler


def test_idempotent_request_on_a_just_closed_connection_is_retried(run: Runner) -> None:
    async def main() -> None:
        async with Backend(_closes_on_second_request()) as backend, client(backend.url) as pool:
            assert await get(pool, b"/1") == (200, b"ok")
            assert await get(pool, b"/2") == (200, b"ok")  # sent twice, answered on the retry
            assert [r.target for r in backend.requests] == [b"/1", b"/2", b"/2"]
            assert backend.accepted == 2

    run(main())


def test_post_on_a_just_closed_connection_is_not_retried(run: Runner) -> None:
    async def main() -> None:
        async with Backend(_closes_on_second_request()) as backend, client(backend.url) as pool:
            assert await get(pool, b"/1") == (200, b"ok")
            with pytest.raises(BackendConnectionError):
                await pool.request(b"POST", b"/2", b"", b"charge the card")
            # The backend may have acted on it: it must not get it twice.
            assert [r.target for r in backend.requests] == [b"/1", b"/2"]
            assert backend.accepted == 1

    run(main())


# -- 10. responses without a body, interim responses


def test_head_response_ends_at_the_head(run: Runner) -> None:
    async def main() -> None:
        def make(request: Request) -> bytes:
            if request.method == b"HEAD":
                return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            return reply(b"body")

        async with Backend(answer(make)) as backend, client(backend.url, read_timeout=3.0) as pool:
            response = await pool.request(b"HEAD", b"/", b"")
            assert response.status == 200
            assert response.header(b"content-length") == b"1000"
            assert await response.read() == b""
            # Whatever becomes of that connection, the next response is parsed right.
            assert await get(pool) == (200, b"body")
            assert [r.method for r in backend.requests] == [b"HEAD", b"GET"]

    run(main())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
    ],
    ids=["204", "304"],
)
def test_bodyless_status_reuses_the_connection(run: Runner, head: bytes) -> None:
    async def main() -> None:
        responses = iter([head, reply(b"next")])
        async with (
            Backend(answer(lambda _: next(responses))) as backend,
            client(backend.url, read_timeout=3.0) as pool,
        ):
            response = await pool.request(b"GET", b"/", b"")
            assert response.status in (204, 304)
            assert await response.read() == b""
            assert pool.connections == 1
            assert await get(pool) == (200, b"next")
            assert backend.accepted == 1

    run(main())


def test_interim_100_continue_is_skipped(run: Runner) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)  # a separate read on the client's side
        writer.write(reply(b"done", 200, b"X-Final: 1"))
        await writer.drain()
        await backend.read(reader)
        writer.write(reply(b"again"))
        await writer.drain()
        await hold(reader)

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url) as pool:
            response = await pool.request(b"POST", b"/", b"", b"x")
            assert response.status == 200
            assert response.headers == [(b"X-Final", b"1"), (b"Content-Length", b"4")]
            assert await response.read() == b"done"
            assert await get(pool) == (200, b"again")
            assert backend.accepted == 1

    run(main())


# -- 11. backpressure


def test_slow_consumer_pauses_reading_and_gets_every_byte(run: Runner) -> None:
    size = 8 << 20
    body = pattern(size, 3)

    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await backend.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        view = memoryview(body)
        for start in range(0, size, 256 << 10):
            writer.write(view[start : start + (256 << 10)])
            await writer.drain()
        await hold(reader)

    async def main() -> None:
        # read_timeout shorter than the consumer's pause: a paused stream must not time out.
        async with Backend(handler) as backend, client(backend.url, read_timeout=0.2) as pool:
            response = await pool.request(b"GET", b"/big", b"")
            conn = response._conn
            assert conn is not None
            chunks = response.chunks()
            received = [await anext(chunks)]
            await until(lambda: conn.reading_paused)
            buffered = response._buffered
            await asyncio.sleep(0.4)
            assert conn.reading_paused
            assert response._buffered == buffered  # nothing more was read while paused
            assert buffered <= http1._PAUSE_AT + (1 << 20)
            async for chunk in chunks:
                received.append(chunk)
                await asyncio.sleep(0.005)
            assert sum(map(len, received)) == size
            assert b"".join(received) == body
            assert max(map(len, received)) <= http1._PAUSE_AT + (1 << 20)
            assert pool._idle == [conn]  # read to the end: back in the pool

    run(main())


def test_read_never_pauses(run: Runner) -> None:
    body = pattern(4 << 20, 4)

    async def main() -> None:
        async with Backend(answer(lambda _: reply(body))) as backend, client(backend.url) as pool:
            response = await pool.request(b"GET", b"/", b"")
            conn = response._conn
            assert conn is not None
            assert await response.read() == body
            assert not conn.reading_paused
            assert await get(pool) == (200, body)
            assert backend.accepted == 1

    run(main())


def test_stream_body_waits_for_a_backend_that_is_not_reading(run: Runner) -> None:
    part, count = pattern(64 << 10, 5), 256  # 16 MiB in all
    produced = 0

    async def parts() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(count):
            await asyncio.sleep(0)
            produced += 1
            yield part

    async def main() -> None:
        release = asyncio.Event()
        digest = hashlib.sha256(part * count).hexdigest().encode()

        async def handler(
            backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
        ) -> None:
            await release.wait()  # not reading: the request fills the socket buffers
            request = await backend.read(reader)
            assert request is not None
            writer.write(reply(hashlib.sha256(request.body).hexdigest().encode()))
            await writer.drain()
            await hold(reader)

        async with (
            Backend(handler, rcvbuf=64 << 10) as backend,
            client(backend.url) as pool,
        ):
            task = asyncio.create_task(pool.request(b"POST", b"/", b"", parts()))
            seen, steady = -1, 0
            while steady < 20:  # until the producer has stood still for a while
                await asyncio.sleep(0.005)
                seen, steady = produced, steady + 1 if produced == seen else 0
            assert 0 < produced < count
            release.set()
            response = await task
            assert produced == count
            assert await response.read() == digest

    run(main())


# -- 12. closing responses


def test_closing_an_unread_response_drops_its_connection(run: Runner) -> None:
    async def handler(
        backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        while (request := await backend.read(reader)) is not None:
            if request.target == b"/big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 10)
                await writer.drain()
                await hold(reader)
                return
            writer.write(reply(b"small"))
            await writer.drain()

    async def main() -> None:
        async with Backend(handler) as backend, client(backend.url) as pool:
            response = await pool.request(b"GET", b"/big", b"")
            response.close()
            with pytest.raises(BackendConnectionError):
                await response.read()
            await until(lambda: backend.ended == [1])
            assert pool.connections == 0
            assert await get(pool, b"/small") == (200, b"small")
            assert backend.accepted == 2

    run(main())


def test_closing_a_response_read_to_the_end_keeps_its_connection(run: Runner) -> None:
    async def main() -> None:
        async with (
            Backend(answer(lambda r: reply(r.target), delay=0.02)) as backend,
            client(backend.url) as pool,
        ):
            first = await pool.request(b"GET", b"/1", b"")
            assert await first.read() == b"/1"
            first.close()
            task = asyncio.create_task(pool.request(b"GET", b"/2", b""))
            await until(lambda: len(backend.requests) == 2)  # sent on the same connection
            first.close()  # again, while that connection waits for the second response
            second = await task
            assert await second.read() == b"/2"
            second.close()
            assert backend.accepted == 1
            assert pool.connections == 1
            assert backend.ended == []

    run(main())


# -- 13. HTTPS


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@dataclass
class Certs:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A test CA, a server certificate it signed for localhost/127.0.0.1, and a second CA."""
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.pem",
                 "-subj", f"/CN=Tollway test {name}", "-days", "2")  # fmt: skip
    _openssl("req", *ec, "-keyout", d / "server.key", "-out", d / "server.csr",
             "-subj", "/CN=localhost")  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem",
             "-CAkey", d / "ca.key", "-CAcreateserial", "-out", d / "server.pem",
             "-days", "2", "-extfile", d / "ext.cnf")  # fmt: skip
    return Certs(d / "ca.pem", d / "other-ca.pem", d / "server.pem", d / "server.key")


def _server_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    return context


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_request_to_a_trusted_backend(
    run: Runner, certs: Certs, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    body = pattern(100_000, 6)

    async def main() -> None:
        handler = answer(lambda r: reply(r.headers[b"host"] + b"|" + body))
        async with (
            Backend(handler, ssl_context=_server_context(certs)) as backend,
            client(f"https://{host}:{backend.port}/v1") as pool,
        ):
            for _ in range(2):
                status, received = await get(pool)
                assert status == 200
                assert received == f"{host}:{backend.port}|".encode() + body
            assert backend.accepted == 1

    run(main())


def test_https_backend_with_an_untrusted_certificate_is_a_connection_error(
    run: Runner, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.other_ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def main() -> None:
        handler = answer(lambda _: reply(b"secret"))
        async with Backend(handler, ssl_context=_server_context(certs)) as backend:
            async with client(backend.url) as pool:
                with pytest.raises(BackendConnectionError):
                    await pool.request(b"GET", b"/", b"")
                assert pool.connections == 0
            assert backend.requests == []

    run(main())
