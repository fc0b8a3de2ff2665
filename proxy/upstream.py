"""Backends: one HTTP/1.1 connection pool per backend, request targets, credentials, pools.

The hot path uses `proxy.http1` (bench/RESULTS.md "Upstream client": aiohttp costs ~4x the
CPU per request, httpx's pool collapses under concurrency). Responses are never decompressed
here: the gateway forwards the bytes it was sent.
"""

from __future__ import annotations

import asyncio
import itertools
from urllib.parse import quote, quote_from_bytes, urlsplit

from proxy.config import Backend, Config
from proxy.errors import BackendUnavailableError
from proxy.http1 import Body, ConnectionPool, Response


class Upstream:
    """A single backend: its base URL, credentials and pooled connections."""

    def __init__(self, backend: Backend):
        self.id = backend.id
        self.url = backend.url
        base_path = urlsplit(backend.url).path.rstrip("/")
        self._base = quote(base_path, safe="/%:@!$&'()*+,;=-._~").encode("ascii")
        creds = backend.credentials
        self.credential_header = creds.header.lower().encode("latin-1") if creds else b""
        # One ready-made header line, appended to every request (validated: no CR/LF).
        self.credential_line = (
            b"%b: %b\r\n" % (self.credential_header, creds.value.encode("latin-1"))
            if creds
            else b""
        )
        self._limit = backend.max_connections
        self._connect_timeout = float(backend.timeout.connect)
        self._read_timeout = float(backend.timeout.read)
        self._pool: ConnectionPool | None = None
        self._targets: dict[str, bytes] = {}

    async def open(self) -> None:
        self._pool = ConnectionPool(
            self.url,
            limit=self._limit,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def target(self, subpath: str, query: str = "") -> bytes:
        """The request target for `subpath` (already confined and percent-encoded) and query.

        Built by concatenation onto the base path, never by URL joining, so nothing in the
        subpath can change the scheme, host or base path.
        """
        if not query:
            cached = self._targets.get(subpath)
            if cached is None:
                cached = self._targets[subpath] = self._base + b"/" + _ascii(subpath)
            return cached
        return b"%b/%b?%b" % (self._base, _ascii(subpath), _ascii(query))

    async def send(
        self, method: str, target: bytes, headers: bytes, body: Body, length: int | None = None
    ) -> Response:
        """Send one request; the caller must close the response."""
        pool = self._pool
        if pool is None:
            raise BackendUnavailableError("The backend is not open.")
        return await pool.request(_method(method), target, headers, body, length)


_METHODS: dict[str, bytes] = {}


def _method(method: str) -> bytes:
    encoded = _METHODS.get(method)
    if encoded is None:
        encoded = _METHODS[method] = method.encode("ascii")
    return encoded


def _ascii(text: str) -> bytes:
    """`text` (raw bytes as latin-1) as it may appear in a request target: bytes outside
    printable ASCII percent-encoded, everything else (including %XX) left as it was."""
    raw = text.encode("latin-1")
    if text.isascii() and text.isprintable() and " " not in text:
        return raw
    return quote_from_bytes(raw, safe="/%:@!$&'()*+,;=-._~?").encode("ascii")


class Pool:
    """A `type: pool` backend: weighted round robin within the most preferred priority.

    Retries and circuit breakers come with the resilience work; for now the pool spreads load.
    """

    def __init__(self, backend: Backend, members: dict[str, Upstream]):
        self.id = backend.id
        best = min(s.priority for s in backend.services)
        order = [
            members[s.id] for s in backend.services if s.priority == best for _ in range(s.weight)
        ]
        self._cycle = itertools.cycle(order)

    def pick(self) -> Upstream:
        return next(self._cycle)


class Backends:
    """All configured backends, opened and closed together by the app's lifespan."""

    def __init__(self, config: Config):
        self._singles = {b.id: Upstream(b) for b in config.backends if b.type == "single"}
        self._pools = {b.id: Pool(b, self._singles) for b in config.backends if b.type == "pool"}

    async def open(self) -> None:
        for upstream in self._singles.values():
            await upstream.open()

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self._singles.values()))

    def pick(self, backend_id: str) -> Upstream:
        """The upstream to use for one request to `backend_id` (a single or a pool)."""
        single = self._singles.get(backend_id)
        if single is not None:
            return single
        return self._pools[backend_id].pick()
