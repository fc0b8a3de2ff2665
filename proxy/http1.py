"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections on asyncio
Protocols, responses parsed by httptools (llhttp, in C).

Why not aiohttp: forwarding one request through `aiohttp.ClientSession` costs ~75 µs of CPU
on this hardware, more than the rest of the gateway together; this client does the same job
in a fraction of that (bench/RESULTS.md "Upstream client"). It does only what a gateway
needs: bytes in, bytes out. Request headers arrive as the bytes the ASGI server gave us and
leave as one buffer; response bodies are never decoded or decompressed.

Errors are the gateway's own (`BackendConnectionError` → 502, `BackendTimeoutError` → 504)
and never carry backend detail.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import urlsplit

import httptools

from proxy.errors import (
    BackendConnectionError,
    BackendConnectTimeoutError,
    BackendTimeoutError,
    GatewayError,
)

Body = bytes | AsyncIterable[bytes] | None
RawHeaders = list[tuple[bytes, bytes]]

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_PAUSE_AT = 1 << 20  # stop reading a streamed response this far ahead of its consumer
_RESUME_AT = 1 << 18
_MAX_HEAD = 64 * 1024  # response status line + headers


class Response:
    """A backend response: status and raw headers at once, the body as it arrives.

    Either `read()` the whole body or iterate `chunks()`; then (or instead) `close()`.
    A response read to its end has already given its connection back to the pool.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_waiter",
        "_whole",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, status: int, headers: RawHeaders):
        self.status = status
        self.headers = headers  # names as the backend sent them
        self._conn: _Connection | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: GatewayError | None = None
        self._whole = False  # read() wants it all: never pause reading
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def content_type(self) -> str:
        """The media type, lower-case, without parameters ("" if none)."""
        value = self.header(b"content-type") or b""
        return value.partition(b";")[0].strip().lower().decode("latin-1")

    async def read(self) -> bytes:
        """The whole body."""
        self._whole = True
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume_reading()
        while not self._done:
            await self._wait()
        if self._error is not None:
            raise self._error
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: everything buffered so far, joined, each step."""
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.reading_paused:
                    conn.resume_reading()
                yield data
            elif self._done:
                if self._error is not None:
                    raise self._error
                return
            else:
                await self._wait()

    def close(self) -> None:
        """Release the response; a connection whose body was not read to its end is dropped."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()
            self._finish(BackendConnectionError())

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> int:
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered

    def _finish(self, error: GatewayError | None = None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._conn = None
            self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection and its response parser."""

    def __init__(self, pool: ConnectionPool):
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.idle_since = 0.0
        self.reading_paused = False
        self._alive = True
        self._received = False  # any byte of the current response?
        self._head_size = 0
        self._headers: RawHeaders = []
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._eof_body = False  # body delimited by the connection closing
        self._no_body = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._writing = False  # a streamed request body is still being sent

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received = True
        self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(BackendConnectionError())
        except httptools.HttpParserUpgrade:
            self._fail(BackendConnectionError())

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._alive = False
        self._cancel_timer()
        self.pool._forget(self)
        response = self._response
        if response is not None and exc is None and self._eof_body:
            self._response = None
            response._finish()
        else:
            self._fail(BackendConnectionError())
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > _MAX_HEAD:
            raise httptools.HttpParserError("response head too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self._headers, self._head_size = self._headers, [], 0
        if status < 200:  # 1xx interim responses are skipped
            return
        head = self._head
        if head is None or head.done():
            raise httptools.HttpParserError("response without a request")
        response = self._response = Response(self, status, headers)
        if self._no_body or status in (204, 304):
            self._complete(response, keep=not self._no_body and self.parser.should_keep_alive())
        else:
            self._eof_body = _delimited_by_close(headers)
        head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None:
            return
        if response._feed(body) > _PAUSE_AT and not response._whole and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._headers:  # trailers of a chunked body: dropped, not the next response's
            self._headers, self._head_size = [], 0
        response = self._response
        if response is not None:
            self._complete(response, keep=self.parser.should_keep_alive())

    # -- used by the pool and responses

    @property
    def usable(self) -> bool:
        return self._alive and self.transport is not None and not self.transport.is_closing()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self._last_read = self.loop.time()
            self.transport.resume_reading()

    def abort(self) -> None:
        self._alive = False
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, head: bytes, body: Body, no_body: bool, chunked: bool) -> Response:
        """Send one request and wait for the response's status and headers."""
        transport = self.transport
        assert transport is not None
        self._received = False
        self._no_body = no_body
        self._eof_body = False
        head_future: asyncio.Future[Response] = self.loop.create_future()
        self._head = head_future
        try:
            if isinstance(body, bytes):
                if len(body) <= 16384:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                transport.write(head)
                if body is not None:
                    self._writing = True
                    try:
                        await self._write_stream(body, chunked)
                    finally:
                        self._writing = False
            self._last_read = self.loop.time()
            self._arm_timer()
            return await head_future
        except BaseException:
            _abandon(self, head_future)
            raise
        finally:
            if self._head is head_future:  # the connection may already serve the next one
                self._head = None

    async def _write_stream(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if not self._alive:
                break
            if chunked:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if self._write_paused:
                self._drain = self.loop.create_future()
                await self._drain
                self._drain = None
        if chunked and self._alive:
            transport.write(b"0\r\n\r\n")

    def _complete(self, response: Response, keep: bool) -> None:
        self._response = None
        self._cancel_timer()
        response._finish()
        # A backend may answer before the request body ends (nginx's `return 403` does):
        # the rest of the body is still to come on this connection, so it can serve no
        # other request — the next one would be read as part of this body.
        if keep and self._alive and not self._writing:
            self.pool._release(self)
        else:
            self.abort()

    def _fail(self, error: GatewayError) -> None:
        """The connection broke: fail whatever is waiting on it and drop it."""
        head, response = self._head, self._response
        self._response = None
        if head is not None and not head.done():
            head.set_exception(error)
        if response is not None:
            response._finish(error)
        self.abort()

    # -- read timeout: time since the last byte, checked lazily (no timer churn per read)

    def _arm_timer(self) -> None:
        timeout = self.pool.read_timeout
        if timeout > 0:
            self._timer = self.loop.call_at(self._last_read + timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.reading_paused:  # our consumer is slow, not the backend
            self._last_read = self.loop.time()
        if self.loop.time() - self._last_read >= self.pool.read_timeout:
            self._fail(BackendTimeoutError())
        else:
            self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def received_nothing(self) -> bool:
        return not self._received


def _abandon(conn: _Connection, head: asyncio.Future[Response]) -> None:
    """The exchange on `conn` whose head is `head` ends without its caller getting the
    response (cancelled, or the connection failed). Until the head arrived the connection
    is mid-exchange, its state unknown: drop it. Once it arrived, the response decides: one
    already read to its end has put the connection back in the pool, where another request
    may be using it by now, so it is left alone; one still being read is dropped by
    `close()`. (A task is told of its cancellation only when it next runs: under load the
    response can arrive, and the connection serve another request, in between.)"""
    if head.done() and not head.cancelled() and head.exception() is None:
        head.result().close()
    else:
        conn.abort()


def _delimited_by_close(headers: RawHeaders) -> bool:
    for name, _ in headers:
        lower = name.lower()
        if lower == b"content-length" or lower == b"transfer-encoding":
            return False
    return True


class ConnectionPool:
    """Keep-alive connections to one origin (scheme, host, port), at most `limit` at once."""

    def __init__(
        self,
        url: str,
        *,
        limit: int = 100,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        idle_timeout: float = 15.0,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._opening = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: bytes,
        body: Body = None,
        length: int | None = None,
    ) -> Response:
        """Send `method target` with `headers` (pre-formatted "name: value\\r\\n" lines, no
        Host or framing headers) and `body`; return once the response headers are in.

        A streamed body is sent with Content-Length `length` when given, else chunked.

        The caller must `close()` the response (or read it to the end).
        """
        chunked = False
        if isinstance(body, bytes):
            framing = b"content-length: %d\r\n" % len(body)
        elif body is None:
            framing = b"content-length: 0\r\n" if method in (b"POST", b"PUT", b"PATCH") else b""
        elif length is not None:
            framing = b"content-length: %d\r\n" % length
        else:
            framing, chunked = b"transfer-encoding: chunked\r\n", True
        head = b"%b %b HTTP/1.1\r\nhost: %b\r\n%b%b\r\n" % (
            method,
            target,
            self.authority,
            headers,
            framing,
        )
        no_body = method == b"HEAD"
        retry = method in _IDEMPOTENT and not _is_stream(body)
        while True:
            conn = await self._acquire()
            try:
                return await conn.exchange(head, body, no_body, chunked)
            except BackendConnectionError:
                if retry and conn.reused and conn.received_nothing():
                    retry = False  # a kept-alive connection the backend had just closed
                    continue
                raise

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise BackendConnectionError()
        idle = self._idle
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                conn.reused = True
                return conn
            conn.abort()
        while len(self._all) + self._opening >= self.limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():  # woken, then cancelled: pass the wake-up on
                    self._wake_one()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if idle:
                conn = idle.pop()
                if conn.usable:
                    conn.reused = True
                    return conn
                conn.abort()
        return await self._connect()

    async def _connect(self) -> _Connection:
        self._opening += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise BackendConnectTimeoutError() from None
        except OSError:
            raise BackendConnectionError() from None
        finally:
            self._opening -= 1
            self._wake_one()
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connections(self) -> int:
        """Open connections, busy or idle."""
        return len(self._all)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let connection_lost callbacks run


def _is_stream(body: Body) -> bool:
    return body is not None and not isinstance(body, bytes)
