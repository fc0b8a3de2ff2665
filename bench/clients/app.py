"""Raw-ASGI pass-through used to compare upstream clients under Granian.

Reads the request body, POSTs the original bytes to ``$BENCH_UPSTREAM + path`` with the
client named by ``$BENCH_CLIENT`` (see :mod:`bench.clients.upstream`), and answers with the
upstream status, content-type and body. ``/v1/sse`` is streamed through chunk by chunk
with aiohttp, iterating as ``$BENCH_SSE_MODE`` says (see :data:`SSE_MODES`).

    BENCH_CLIENT=aiohttp BENCH_UPSTREAM=http://127.0.0.1:8081 \\
        granian --interface asgi --loop uvloop --workers 1 bench.clients.app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from bench.clients.upstream import Upstream, aiohttp_session, open_upstream

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CLIENT = os.environ.get("BENCH_CLIENT", "aiohttp")
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8081")
SSE_MODE = os.environ.get("BENCH_SSE_MODE", "iter_any")
SSE_MODES = ("read", "iter_any", "iter_chunked", "readany", "lines")
SSE_PATH = "/v1/sse"
_state: dict[str, Any] = {}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _state["upstream"] = open_upstream(CLIENT)
            _state["session"] = aiohttp_session()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _state["upstream"].aclose()
            await _state["session"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


def _content_type(scope: Message) -> str:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1"))
    return "application/octet-stream"


async def _chunks(resp: aiohttp.ClientResponse, mode: str) -> AsyncIterator[bytes]:
    """Yield the upstream body the way ``mode`` reads it."""
    if mode == "read":
        yield await resp.read()
    elif mode == "iter_any":
        async for chunk in resp.content.iter_any():
            yield chunk
    elif mode == "iter_chunked":
        async for chunk in resp.content.iter_chunked(16384):
            yield chunk
    elif mode == "readany":
        while chunk := await resp.content.readany():
            yield chunk
    else:  # "lines": one ASGI message per SSE line, as an event parser would see them
        async for line in resp.content:
            yield line


async def _stream(
    session: aiohttp.ClientSession, url: str, body: bytes, ctype: str, send: Send
) -> None:
    async with session.post(url, data=body, headers={"Content-Type": ctype}) as resp:
        headers = [(b"content-type", resp.headers.get("Content-Type", "").encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        async for chunk in _chunks(resp, SSE_MODE):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _forward(upstream: Upstream, url: str, body: bytes, ctype: str, send: Send) -> None:
    try:
        status, data, resp_ctype = await upstream.post(url, body, ctype)
    except Exception:
        status, data, resp_ctype = 502, b'{"error":"upstream"}', "application/json"
    headers = [(b"content-type", resp_ctype.encode()), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def app(scope: Message, receive: Receive, send: Send) -> None:
    """ASGI entry point."""
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["type"] != "http":
        return None
    body = await _read_body(receive)
    url = UPSTREAM + scope["path"]
    if scope["path"] == SSE_PATH:
        return await _stream(_state["session"], url, body, _content_type(scope), send)
    return await _forward(_state["upstream"], url, body, _content_type(scope), send)
