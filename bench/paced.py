"""A paced SSE backend cheap enough to feed thousands of streams from one shared core.

`tollway mock-llm` is the functional mock (faults, embeddings, every operation), built on
Granian; a paced event there costs ~20 µs of CPU, so 2,000 streams at 20 ms (100k events/s)
would need two cores for the mock alone. This one answers `POST .../chat/completions` on raw
uvloop Protocols with pre-framed chunks: one `transport.write` and one timer per event.

    taskset -c 0 python -m bench.paced --port 9100 [--ttft 20] [--itl 20] [--tokens 64]

Streamed requests (`"stream":true` in the body) get: the role chunk, `--tokens` content
deltas `--itl` ms apart (the first `--ttft` ms after the request), a finish chunk, a usage
chunk and `data: [DONE]`, chunked. Anything else that POSTs gets a fixed chat.completion;
`GET /v1/models` answers for readiness. Keep-alive, HTTP/1.1 only, no pipelining.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

import httptools
import uvloop

_CHUNK = (
    '{"id":"chatcmpl-paced","object":"chat.completion.chunk","created":1700000000,'
    '"model":"gpt-4o-mini","choices":[{"index":0,"delta":%s,"finish_reason":%s}]}'
)
_USAGE = (
    '{"id":"chatcmpl-paced","object":"chat.completion.chunk","created":1700000000,'
    '"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
    '"total_tokens":%d}}'
)
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-paced",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, benchmark."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    },
    separators=(",", ":"),
).encode()
_MODELS = b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","owned_by":"bench"}]}'
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_END = b"0\r\n\r\n"


def _framed(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def _whole(body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
    return head % (content_type, len(body)) + body


def stream_payloads(tokens: int) -> list[bytes]:
    """The SSE events of one stream: role, `tokens` deltas, finish, usage, [DONE]."""
    data = [_CHUNK % ('{"role":"assistant","content":""}', "null")]
    data += [_CHUNK % ('{"content":" tok"}', "null")] * tokens
    data += [_CHUNK % ("{}", '"stop"'), _USAGE % (tokens, tokens + 12), "[DONE]"]
    return [b"data: " + d.encode() + b"\n\n" for d in data]


def stream_events(tokens: int) -> list[bytes]:
    """`stream_payloads` chunk-framed for the wire, the last one ending the body."""
    events = [_framed(e) for e in stream_payloads(tokens)]
    events[-1] += _END
    return events


class _Server(asyncio.Protocol):
    """One client connection: parse a request, answer it, wait for the next."""

    def __init__(self, events: list[bytes], ttft: float, itl: float) -> None:
        self._events, self._ttft, self._itl = events, ttft, itl
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._body = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._next = 0
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._body.clear()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._parser.get_method() == b"GET":
            transport.write(_whole(_MODELS))
        elif b'"stream":true' in self._body.replace(b" ", b""):
            transport.write(_SSE_HEAD)
            self._next = 0
            self._timer = self._loop.call_later(self._ttft, self._tick)
        else:
            transport.write(_whole(_COMPLETION))

    def _tick(self) -> None:
        transport = self._transport
        if transport is None:
            return
        events, i = self._events, self._next
        # Role chunk and first delta together at TTFT, then one delta per --itl.
        if i == 0:
            transport.write(events[0] + events[1])
            i = 2
        else:
            transport.write(events[i])
            i += 1
        if i >= len(events) - 3:  # finish, usage and [DONE] follow the last delta at once
            transport.write(b"".join(events[i:]))
            self._timer = None
            return
        self._next = i
        self._timer = self._loop.call_later(self._itl, self._tick)


async def serve(host: str, port: int, ttft_ms: float, itl_ms: float, tokens: int) -> None:
    loop = asyncio.get_running_loop()
    events = stream_events(tokens)
    sock = socket.create_server((host, port), backlog=4096, reuse_port=False)
    server = await loop.create_server(
        lambda: _Server(events, ttft_ms / 1000.0, itl_ms / 1000.0), sock=sock
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paced", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttft", type=float, default=20.0, help="ms to the first content delta")
    p.add_argument("--itl", type=float, default=20.0, help="ms between deltas")
    p.add_argument("--tokens", type=int, default=64, help="content deltas per stream")
    args = p.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.ttft, args.itl, args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
