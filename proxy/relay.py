"""Relaying backend responses to the client: whole bodies, SSE event streams, raw streams.

The relay owns streaming semantics (STYLE §10): response headers go out at once, events are
forwarded as they complete, a watcher on `receive()` cancels the request when the client
leaves (Granian speaks ASGI 2.3, where sending to a gone client does not raise), and the
backend response is released in `finally`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from proxy.errors import GatewayError
from proxy.estimate import CompletionCounter
from proxy.exchange import Exchange
from proxy.http1 import Response
from proxy.schemas import Usage, read_chunk, read_response_event
from proxy.sse import EventSplitter, parse_event
from proxy.types import Headers, Receive, Send

if TYPE_CHECKING:
    from proxy.safety.stream import StreamGuard

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_SSE_OWN = frozenset(name for name, _ in SSE_HEADERS) | {b"content-encoding"}


def sse_headers(backend_headers: Headers) -> Headers:
    """Response headers for a relayed event stream: never cached, buffered or compressed."""
    return [h for h in backend_headers if h[0] not in _SSE_OWN] + SSE_HEADERS


_DONE = b"[DONE]"
_encoder = msgspec.json.Encoder()


class DisconnectWatch:
    """Cancels the request's task when the client disconnects.

    Start it only once the request body has been read: it consumes `receive()`. Granian's
    `receive()` returns a future, so watching costs a done-callback, not a task; a server
    whose `receive()` is a coroutine gets it wrapped in a task.
    """

    __slots__ = ("_exchange", "_pending", "_receive", "_task")

    def __init__(
        self, receive: Receive, exchange: Exchange, task: asyncio.Task[object] | None = None
    ):
        self._exchange = exchange
        self._task = task or asyncio.current_task()
        self._receive = receive
        self._pending: asyncio.Future[Any] | None = None
        self._arm()

    def _arm(self) -> None:
        received: Any = self._receive()
        waiting: asyncio.Future[Any] = (
            received if hasattr(received, "add_done_callback") else asyncio.ensure_future(received)
        )
        self._pending = waiting
        waiting.add_done_callback(self._on_message)

    def _on_message(self, done: asyncio.Future[Any]) -> None:
        if self._pending is not done or done.cancelled() or done.exception() is not None:
            return
        if done.result()["type"] == "http.disconnect":
            self._pending = None
            self._exchange.disconnected = True
            if self._task is not None:
                self._task.cancel()
        else:  # the body's empty final message: keep listening
            self._arm()

    def stop(self) -> None:
        pending, self._pending = self._pending, None
        if isinstance(pending, asyncio.Task):
            pending.cancel()


def error_event(error: GatewayError) -> bytes:
    """The one SSE event that ends a stream broken after it started (SPEC §4)."""
    payload = {"error": {"message": error.message, "type": error.type, "code": error.code}}
    return b"data: " + _encoder.encode(payload) + b"\n\n"


class ChatStreamFilter:
    """Chat/completions chunks: reads usage, model and finish reasons, drops the usage-only
    chunk when the client did not ask for it, and drops frames that are not JSON (a
    backend's garbage never reaches an SDK that would choke on it)."""

    __slots__ = ("counter", "dropped", "finish_reasons", "model", "strip_usage", "usage")

    def __init__(self, strip_usage: bool):
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.model = ""
        self.finish_reasons: tuple[str, ...] = ()
        self.dropped = 0
        self.counter: CompletionCounter | None = None  # set when a token limit applies

    def keep(self, event: bytes) -> bool:
        _, data = parse_event(event)
        if not data or data == _DONE:
            return True
        if self.counter is not None:
            self.counter.feed(data)
        chunk = read_chunk(data)
        if chunk is None:
            self.dropped += 1
            return False
        usage, usage_only, model, finished = chunk
        if model and not self.model:
            self.model = model
        if finished:
            self.finish_reasons += finished
        if usage is not None:
            self.usage = usage
            return not (usage_only and self.strip_usage)
        return True


class ResponsesStreamFilter:
    """Responses API events: usage is read from `response.completed`, nothing is injected."""

    __slots__ = ("counter", "dropped", "finish_reasons", "model", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.model = ""
        self.finish_reasons: tuple[str, ...] = ()
        self.dropped = 0
        self.counter: CompletionCounter | None = None

    def keep(self, event: bytes) -> bool:
        _, data = parse_event(event)
        if not data:
            return True
        if self.counter is not None:
            self.counter.feed(data)
        read = read_response_event(data)
        if read is None:
            self.dropped += 1
            return False
        reply = read[1]
        if reply is not None:
            self.usage, self.model, _ = reply
        return True


StreamFilter = ChatStreamFilter | ResponsesStreamFilter


async def relay_events(
    response: Response,
    send: Send,
    keep: Callable[[bytes], bool],
    exchange: Exchange,
    guard: StreamGuard | None = None,
) -> None:
    """Forward an SSE body event by event; a backend failure ends it with one error event.
    The exchange learns the time spent waiting on the backend and when each chunk left.
    A content-safety `guard` decides when the kept events may go out (it may hold them back
    while they are screened) and ends the stream with an error event when it blocks."""
    splitter = EventSplitter()
    more = {"type": "http.response.body", "body": b"", "more_body": True}
    try:
        waited = time.perf_counter()
        async for chunk in response.chunks():
            now = time.perf_counter()
            exchange.backend_seconds += now - waited
            events = splitter.feed(chunk)
            kept = [e for e in events if keep(e)]
            if kept and guard is not None:
                kept = await guard.admit(kept)
            if kept:
                await send({**more, "body": kept[0] if len(kept) == 1 else b"".join(kept)})
                exchange.chunk(now)
            waited = time.perf_counter()
        rest = splitter.flush()
        kept = [rest] if rest.strip() and keep(rest) else []
        if guard is not None:
            kept = await guard.admit(kept) + await guard.end()
        if kept:
            await send({**more, "body": b"".join(kept)})
    except GatewayError as error:
        await send({**more, "body": error_event(error)})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def relay_raw(
    response: Response, send: Send, on_backend_time: Callable[[float], None]
) -> None:
    """Forward a body as the bytes arrive (passthrough APIs)."""
    try:
        waited = time.perf_counter()
        async for chunk in response.chunks():
            on_backend_time(time.perf_counter() - waited)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            waited = time.perf_counter()
    except GatewayError:
        # Headers (maybe a Content-Length) are out; the only honest signal left is to stop
        # short, which the client sees as a truncated body.
        raise _Truncated from None
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Truncated(Exception):
    """The backend broke a raw body mid-way; the response must end without completing."""


Truncated = _Truncated
