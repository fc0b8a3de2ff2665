"""Small ASGI helpers shared by the gateway's handlers: reading bodies, sending responses."""

from __future__ import annotations

import msgspec

from proxy.errors import GatewayError, RequestTooLargeError
from proxy.types import Headers, Receive, Scope, Send

JSON_TYPE = (b"content-type", b"application/json")
_encoder = msgspec.json.Encoder()


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Read the whole request body, refusing (413) past `limit` bytes.

    A declared Content-Length over the limit is refused before any of the body is read.
    `http.disconnect` before the end raises ClientDisconnected: the client left, or (Granian)
    its body could not be parsed, e.g. a bad chunk-size line.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(limit)
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if not body and message["type"] == "http.disconnect":  # gone, or a malformed body
            raise ClientDisconnected
        if len(body) > limit:
            raise RequestTooLargeError(limit)
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(limit)
        parts.append(chunk)
    return b"".join(parts)


class ClientDisconnected(Exception):
    """The client went away; nothing more can be sent to it."""


def error_body(error: GatewayError) -> bytes:
    """The OpenAI-shaped JSON body for a gateway error."""
    return _encoder.encode(
        {"error": {"message": error.message, "type": error.type, "code": error.code}}
    )


def error_headers(error: GatewayError) -> Headers:
    headers = [JSON_TYPE]
    headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers)
    return headers


async def send_response(send: Send, status: int, headers: Headers, body: bytes) -> None:
    """Send a whole response in two messages."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
