"""A backend: its HTTP/1.1 connection pool, request targets and credentials.

The hot path uses `proxy.http1` (bench/RESULTS.md "Upstream client": aiohttp costs ~4x the
CPU per request, httpx's pool collapses under concurrency). Responses are never decompressed
here: the gateway forwards the bytes it was sent.
"""

from __future__ import annotations

from urllib.parse import quote, quote_from_bytes, urlsplit

from proxy.config import Backend
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

    @property
    def connections(self) -> int:
        return self._pool.connections if self._pool is not None else 0

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
