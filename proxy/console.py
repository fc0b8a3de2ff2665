"""The test console at `GET /console` (SPEC §4): one page, served by the gateway itself.

Four package files (`proxy/console/`: the page, its script, style sheet and icon), read once when
the endpoint is made and answered from memory. Plain HTML, CSS and JavaScript: no build step,
nothing fetched from anywhere but this gateway, so it works with no internet. The page reads
`/openapi.json` for the APIs and operations and sends its requests to the gateway from the
browser, like any other client; the gateway treats them like any other client's.

The page's paths are relative (`console/console.js`, `openapi.json`), so it also works behind
a reverse proxy that mounts the gateway under a prefix. Headers: a Content-Security-Policy of
`default-src 'self'` (no inline script or style: a reply rendered by the page cannot run
anything), `nosniff`, and an ETag with `Cache-Control: no-cache`, so a browser revalidates each
time and a new release is picked up at once, for the price of a 304.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import NamedTuple

from proxy.asgi import error_body, error_headers, header, send_response
from proxy.errors import GatewayError, MethodNotAllowedError, OperationNotFoundError
from proxy.types import Headers, Receive, Scope, Send

__all__ = ["CSP", "FILES", "PATH", "ConsoleEndpoint"]

PATH = "/console"
# URL path -> (package file under proxy/console/, content type)
FILES = {
    PATH: ("index.html", "text/html; charset=utf-8"),
    PATH + "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    PATH + "/console.css": ("console.css", "text/css; charset=utf-8"),
    PATH + "/icon.svg": ("icon.svg", "image/svg+xml"),
}
METHODS = ("GET", "HEAD")
# `frame-ancestors`: the page holds keys, so no other site may frame it (clickjacking).
CSP = b"default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
_COMMON: Headers = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


class _Asset(NamedTuple):
    body: bytes
    etag: bytes
    headers: Headers  # of a 200


def _asset(name: str, content_type: str) -> _Asset:
    body = (resources.files("proxy") / "console" / name).read_bytes()
    etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:32].encode("ascii")
    headers = [
        (b"content-type", content_type.encode("ascii")),
        (b"content-length", b"%d" % len(body)),
        (b"etag", etag),
        *_COMMON,
    ]
    return _Asset(body, etag, headers)


def _matches(if_none_match: bytes, etag: bytes) -> bool:
    """RFC 9110 §13.1.2: weak comparison against each listed tag, or `*`."""
    tags = [tag.strip() for tag in if_none_match.split(b",")]
    return b"*" in tags or any(tag.removeprefix(b"W/") == etag for tag in tags)


class ConsoleEndpoint:
    """The `/console` path tree: the page and its two files; GET and HEAD only."""

    def __init__(self) -> None:
        self._assets = {path: _asset(name, kind) for path, (name, kind) in FILES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        asset = self._assets.get(path)
        if asset is None:
            if path == PATH + "/":  # the page's relative links need the path without "/"
                headers = [(b"location", b"../console"), *_COMMON]
                await send_response(send, 308, headers, b"")
                return
            await _error(send, OperationNotFoundError())
            return
        if scope["method"] not in METHODS:
            await _error(send, MethodNotAllowedError(METHODS))
            return
        condition = header(scope, b"if-none-match")
        if condition is not None and _matches(condition, asset.etag):
            await send_response(send, 304, [(b"etag", asset.etag), *_COMMON], b"")
            return
        body = b"" if scope["method"] == "HEAD" else asset.body
        await send_response(send, 200, asset.headers, body)


async def _error(send: Send, error: GatewayError) -> None:
    headers = [*error_headers(error), (b"x-content-type-options", b"nosniff")]
    await send_response(send, error.status, headers, error_body(error))
