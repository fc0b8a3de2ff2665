"""Backends: one pooled aiohttp session per backend, URL building, and error mapping.

aiohttp serves the hot path because httpx's connection pool collapses under concurrency on
this hardware (bench/RESULTS.md "Upstream client choice"); httpx stays for tests and side calls.
Responses are never decompressed here: the gateway forwards the bytes it was sent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, Iterator
from contextlib import contextmanager

import aiohttp
from yarl import URL

from proxy.config import Backend, Config
from proxy.errors import BackendConnectionError, BackendTimeoutError, BackendUnavailableError


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate aiohttp's exceptions into the gateway's, without backend detail."""
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise BackendTimeoutError from exc
    except aiohttp.ClientError as exc:
        raise BackendConnectionError from exc
    except OSError as exc:
        raise BackendConnectionError from exc


Body = bytes | AsyncIterable[bytes] | None


class Upstream:
    """A single backend: its base URL, credentials and pooled connections."""

    def __init__(self, backend: Backend):
        self.id = backend.id
        base = backend.url.rstrip("/")
        self._base = base
        self._credentials = (
            (backend.credentials.header, backend.credentials.value) if backend.credentials else None
        )
        self.credential_header = (
            backend.credentials.header.lower().encode("latin-1") if backend.credentials else b""
        )
        self._max_connections = backend.max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=float(backend.timeout.connect),
            sock_read=float(backend.timeout.read),
        )
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, subpath: str, query: str = "") -> URL:
        """The backend URL for `subpath` (already confined and percent-encoded) and query.

        Built by concatenation onto the base URL, never by URL joining, so nothing in the
        subpath can change the scheme, host or base path.
        """
        if not query:
            cached = self._urls.get(subpath)
            if cached is None:
                cached = self._urls[subpath] = URL(f"{self._base}/{subpath}", encoded=True)
            return cached
        return URL(f"{self._base}/{subpath}?{query}", encoded=True)

    def add_credentials(self, headers: list[tuple[str, str]]) -> None:
        if self._credentials is not None:
            headers.append(self._credentials)

    async def send(
        self, method: str, url: URL, headers: list[tuple[str, str]], body: Body
    ) -> aiohttp.ClientResponse:
        """Send one request; the caller must release the response."""
        session = self._session
        if session is None:
            raise BackendUnavailableError("The backend is not open.")
        with mapped_errors():
            return await session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )


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
