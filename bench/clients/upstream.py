"""The three upstream HTTP clients under comparison, behind one small interface.

* ``httpx``          - ``httpx.AsyncClient`` (httpcore pool), limits 1000 / keep-alive 100;
* ``httpx_aiohttp``  - ``httpx.AsyncClient`` with ``httpx_aiohttp.AiohttpTransport``
                       wrapping the same aiohttp session as below;
* ``aiohttp``        - ``aiohttp.ClientSession`` on a ``TCPConnector``;
* ``tollway``        - the gateway's own HTTP/1.1 client (``proxy.http1``, httptools parser).

Each adapter must be created inside a running event loop.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx

from proxy.http1 import ConnectionPool

CLIENTS = ("httpx", "httpx_aiohttp", "aiohttp", "tollway")
POOL_LIMIT = 1000
KEEPALIVE = 100
TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
CONTENT_TYPE = "application/json"
REQUEST_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello to the Tollway benchmark."}],"max_tokens":64}'
)


class Upstream(Protocol):
    """What the load loop and the pass-through app need from a client."""

    async def post(self, url: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """POST ``body``; return (status, response body, response content-type)."""
        ...

    async def aclose(self) -> None:
        """Release the connection pool."""
        ...


def aiohttp_session(limit: int = POOL_LIMIT) -> aiohttp.ClientSession:
    """An aiohttp session tuned for a proxy hot path (no decompression, no User-Agent)."""
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
    )


class AiohttpUpstream:
    """``aiohttp.ClientSession``; the body is read with ``await resp.read()``."""

    def __init__(self) -> None:
        self.session = aiohttp_session()

    async def post(self, url: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """POST through the session."""
        headers = {"Content-Type": content_type}
        async with self.session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            return resp.status, data, resp.headers.get("Content-Type", "")

    async def aclose(self) -> None:
        """Close the session and its connector."""
        await self.session.close()


class HttpxUpstream:
    """``httpx.AsyncClient``, with httpcore's pool or with a given transport."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=POOL_LIMIT, max_keepalive_connections=KEEPALIVE),
            timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            transport=transport,
        )

    async def post(self, url: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """POST through the client (the body is read fully by ``post``)."""
        resp = await self.client.post(url, content=body, headers={"content-type": content_type})
        return resp.status_code, resp.content, resp.headers.get("content-type", "")

    async def aclose(self) -> None:
        """Close the client (and its transport)."""
        await self.client.aclose()


class TollwayUpstream:
    """``proxy.http1.ConnectionPool``, one per origin; the body is read with ``read()``."""

    def __init__(self) -> None:
        self.pools: dict[str, tuple[ConnectionPool, bytes]] = {}

    async def post(self, url: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """POST through the pool for ``url``'s origin."""
        entry = self.pools.get(url)
        if entry is None:
            parts = urlsplit(url)
            pool = ConnectionPool(url, limit=POOL_LIMIT, read_timeout=TIMEOUT_S)
            entry = self.pools[url] = (pool, parts.path.encode() or b"/")
        pool, target = entry
        headers = b"content-type: %b\r\n" % content_type.encode()
        response = await pool.request(b"POST", target, headers, body)
        data = await response.read()
        return response.status, data, response.content_type

    async def aclose(self) -> None:
        """Close every pool."""
        for pool, _ in self.pools.values():
            await pool.close()


def open_upstream(name: str) -> Upstream:
    """Create the adapter called ``name`` (one of :data:`CLIENTS`)."""
    if name == "aiohttp":
        return AiohttpUpstream()
    if name == "httpx":
        return HttpxUpstream()
    if name == "httpx_aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return HttpxUpstream(AiohttpTransport(client=aiohttp_session()))
    if name == "tollway":
        return TollwayUpstream()
    raise ValueError(f"unknown client {name!r}; expected one of {CLIENTS}")
