"""Endpoint handlers for configured APIs: identify → read → forward → relay.

`OpenAIHandler` serves the five operations of an openai-type API: it validates the fields the
gateway relies on, asks streamed chat/completions for usage and strips that chunk again for
clients that did not ask, and applies the API's token limits (reserve before forwarding,
settle once however the request ends). `PassthroughHandler` forwards any verb and subpath,
bodies streamed both ways.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from proxy.asgi import ClientDisconnected, header, read_body
from proxy.auth import ApiGuard, Identity, UnknownKeyError
from proxy.config import Api
from proxy.dispatch import Backends
from proxy.errors import RequestTooLargeError
from proxy.exchange import Exchange
from proxy.http1 import Body, Response
from proxy.policies.token_limit import Metering, TokenLimits
from proxy.policies.token_metric import TokenMetrics
from proxy.relay import (
    ChatStreamFilter,
    DisconnectWatch,
    ResponsesStreamFilter,
    StreamFilter,
    relay_events,
    relay_raw,
    sse_headers,
)
from proxy.routing import Match, confine
from proxy.safety.flatten import reply_texts
from proxy.safety.policy import (
    SafetyPolicies,
    SafetyPolicy,
    check_reply,
    check_request,
    completion_policies,
)
from proxy.safety.stream import StreamGuard, stream_texts
from proxy.schemas import (
    ChatRequest,
    CompletionRequest,
    RequestView,
    ResponsesRequest,
    decode_request,
    max_tokens_of,
    read_reply,
    wants_usage,
    with_stream_usage,
)
from proxy.telemetry.tracecontext import traceparent
from proxy.types import Headers, Receive, Scope, Send

if TYPE_CHECKING:  # the cache (numpy) is imported only when a config has a lookup
    from proxy.cache.policy import Lookup, SemanticCaches

Cached = ChatRequest | CompletionRequest | ResponsesRequest  # what the semantic cache serves

# Never forwarded in either direction (RFC 9110 §7.6.1), plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
_RESPONSE_DROP = HOP_BY_HOP | {b"x-request-id", b"x-tollway-overhead-ms"}


class ApiHandler:
    """What both API types share: identification, header and query hygiene."""

    def __init__(
        self,
        api: Api,
        guard: ApiGuard,
        backends: Backends,
        max_body: int,
        drop: frozenset[bytes] = frozenset(),
    ):
        self.api = api
        self.guard = guard
        self.route = backends.route(api.backend)
        self.max_body = max_body
        # Request headers never forwarded: `drop` is what a subclass adds; when the request
        # is traced, the client's traceparent gives way to the gateway's.
        self._drop = (
            HOP_BY_HOP
            | drop
            | self.route.credential_headers
            | {
                api.subscription_key_names.header.lower().encode("latin-1"),
                b"x-request-id",
            }
        )
        self._drop_traced = self._drop | {b"traceparent"}

    async def __call__(
        self, exchange: Exchange, match: Match[Any], scope: Scope, receive: Receive, send: Send
    ) -> None:
        raise NotImplementedError

    def identify(self, exchange: Exchange, scope: Scope) -> Identity:
        """Who is calling, or 401; `UnknownKeyError` for a key this process does not know,
        which the caller hands to `identify_unknown` (so the usual request awaits nothing)."""
        identity = self.guard.identify(scope)
        if identity.subscription is not None:
            exchange.subscription_id = identity.subscription.id
        if identity.product is not None:
            exchange.product_id = identity.product.id
        return identity

    async def identify_unknown(
        self, exchange: Exchange, scope: Scope, miss: UnknownKeyError
    ) -> Identity:
        """Ask the subscription store about the key first: another gateway process may have
        made its subscription a moment ago. 401 if it does not know it either."""
        identity = await self.guard.recheck(scope, miss)
        if identity.subscription is not None:
            exchange.subscription_id = identity.subscription.id
        if identity.product is not None:
            exchange.product_id = identity.product.id
        return identity

    def request_headers(self, scope: Scope, identity: Identity, exchange: Exchange) -> list[bytes]:
        """The client's headers minus hop-by-hop and credentials, as header lines (the ASGI
        server has already refused CR/LF in names and values); `prepare` adds the backend's."""
        consumed = identity.consumed_headers
        trace = exchange.trace  # traced: the backend's parent is this request's span
        drop = self._drop if trace is None else self._drop_traced
        out = [
            b"%b: %b\r\n" % pair
            for pair in scope["headers"]
            if pair[0] not in drop and pair[0] not in consumed
        ]
        out.append(b"x-request-id: %b\r\n" % exchange.request_id.encode("ascii"))
        if trace is not None:
            out.append(b"traceparent: %b\r\n" % traceparent(trace[0], trace[1], trace[3]))
        return out

    @staticmethod
    def query(scope: Scope, identity: Identity) -> str:
        """The raw query string, without the subscription key parameter if one was used."""
        raw: bytes = scope.get("query_string", b"")
        if not raw:
            return ""
        query = raw.decode("latin-1")
        if identity.consumed_query is None:
            return query
        name = identity.consumed_query
        kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != name]
        return "&".join(kept)


def response_headers(response: Response) -> Headers:
    """The backend's response headers minus hop-by-hop; its request id is kept under
    `x-backend-request-id` so the gateway's own `X-Request-Id` is the only one."""
    out: Headers = []
    for name, value in response.headers:
        lower = name.lower()
        if lower not in _RESPONSE_DROP:
            out.append((lower, value))
        elif lower == b"x-request-id":
            out.append((b"x-backend-request-id", value))
    return out


def is_event_stream(response: Response) -> bool:
    return response.content_type == "text/event-stream"


class OpenAIHandler(ApiHandler):
    """The five operations of an openai-type API (SPEC §4)."""

    def __init__(
        self,
        api: Api,
        guard: ApiGuard,
        backends: Backends,
        max_body: int,
        limits: TokenLimits | None = None,
        token_metrics: TokenMetrics | None = None,
        caches: SemanticCaches | None = None,
        safety: SafetyPolicies | None = None,
    ):
        # The gateway reads every response for usage, so it asks for identity encoding.
        super().__init__(api, guard, backends, max_body, frozenset({b"accept-encoding"}))
        self.limits = limits if limits else None
        self.token_metrics = token_metrics
        self.caches = caches if caches else None  # None: no per-request cache work at all
        self.safety = safety if safety else None

    async def __call__(
        self, exchange: Exchange, match: Match[Any], scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            identity = self.identify(exchange, scope)
        except UnknownKeyError as miss:
            identity = await self.identify_unknown(exchange, scope, miss)
        operation = match.operation
        body = await read_body(scope, receive, self.max_body)
        stream_filter: StreamFilter | None = None
        view: RequestView | None = None
        lookup: Lookup | None = None
        outputs: tuple[SafetyPolicy, ...] = ()
        name = identity.subscription.display_name if identity.subscription else ""
        if operation != "models":
            view = decode_request(operation, body)
            exchange.model = view.model or ""
            exchange.max_tokens = max_tokens_of(view)
            if self.safety is not None:  # first: a blocked request is never looked up or
                screens = self.safety.for_product(exchange.product_id)  # charged
                if screens:
                    await check_request(screens, body, exchange)
                    outputs = completion_policies(screens)
            if self.caches is not None and isinstance(view, Cached):
                cache = self.caches.for_product(exchange.product_id)
                if cache is not None:  # before the token limits: a hit costs no tokens
                    lookup = await cache.lookup(view, body, exchange, scope, name)
                    if lookup.entry is not None:
                        if outputs:
                            await check_reply(outputs, _entry_texts(lookup), exchange)
                        await replay(exchange, lookup, view, send)
                        return
            if isinstance(view, ChatRequest | CompletionRequest) and view.stream:
                stream_filter = ChatStreamFilter(strip_usage=not wants_usage(view))
                if stream_filter.strip_usage:
                    body = with_stream_usage(body)
            elif isinstance(view, ResponsesRequest) and view.stream:
                stream_filter = ResponsesStreamFilter()
        exchange.stream = stream_filter is not None
        exchange.backend_id = self.api.backend  # the member once one is chosen
        metering = None
        if self.limits is not None and view is not None:
            policies = self.limits.for_product(exchange.product_id)
            if policies:
                metering = Metering()
                await metering.admit(self.limits, policies, view, len(body), exchange, scope, name)
                if stream_filter is not None:
                    stream_filter.counter = metering.counter
        headers = self.request_headers(scope, identity, exchange)
        headers.append(b"accept-encoding: identity\r\n")
        error: BaseException | None = None
        try:
            await self._forward(
                exchange, match.subpath, self.query(scope, identity), b"".join(headers), body,
                stream_filter, metering, lookup, outputs, send, receive,
            )  # fmt: skip
        except BaseException as exc:
            error = exc
            raise
        finally:
            if metering is not None and not metering.settled:  # (a whole reply settled)
                metering.settle(exchange, error)
            if self.token_metrics is not None:
                self.token_metrics.record(exchange.usage, exchange, scope, name)

    async def _forward(
        self,
        exchange: Exchange,
        subpath: str,
        query: str,
        headers: bytes,
        body: bytes,
        stream_filter: StreamFilter | None,
        metering: Metering | None,
        lookup: Lookup | None,
        outputs: tuple[SafetyPolicy, ...],
        send: Send,
        receive: Receive,
    ) -> None:
        method = exchange.method
        watch = DisconnectWatch(receive, exchange)
        try:
            t = time.perf_counter()
            response = await self.route.send(exchange, method, subpath, query, headers, body)
            try:
                if (
                    stream_filter is not None
                    and response.status == 200
                    and is_event_stream(response)
                ):
                    exchange.backend_seconds += time.perf_counter() - t
                    out = response_headers(response)
                    if metering is not None:
                        out += metering.headers()
                    keep: Callable[[bytes], bool] = stream_filter.keep
                    if lookup is not None:
                        out += lookup.headers()
                        keep = lookup.recording(keep, stream_filter)
                    guard = StreamGuard(outputs, exchange) if outputs else None
                    await exchange.start(send, 200, sse_headers(out))
                    try:
                        await relay_events(response, send, keep, exchange, guard)
                    finally:  # what the stream told, however it ended: a client that
                        # leaves right after the usage chunk is still billed by it
                        exchange.usage = stream_filter.usage
                        exchange.response_model = stream_filter.model
                        exchange.finish_reasons = stream_filter.finish_reasons
                    if guard is not None and guard.blocked:
                        exchange.error_code = "ContentBlocked"
                    elif lookup is not None:
                        lookup.stream_ended(stream_filter)
                else:
                    payload = await response.read()
                    exchange.backend_seconds += time.perf_counter() - t
                    reply = None
                    if response.status == 200 and (reply := read_reply(payload)) is not None:
                        exchange.usage, exchange.response_model, exchange.finish_reasons = reply
                    if outputs and response.status == 200:
                        await check_reply(outputs, reply_texts(payload), exchange)
                    await self._send_whole(exchange, response, payload, metering, lookup, send)
                    if lookup is not None:
                        kind = response.content_type
                        lookup.whole_sent(response.status, kind, payload, reply)
            finally:
                response.close()
        finally:
            watch.stop()

    @staticmethod
    async def _send_whole(
        exchange: Exchange,
        response: Response,
        payload: bytes,
        metering: Metering | None,
        lookup: Lookup | None,
        send: Send,
    ) -> None:
        headers = response_headers(response)
        if metering is not None:  # usage is known: settled now, and the headers say so
            exchange.status = response.status
            metering.settle(exchange, None)
            headers += metering.headers()
        if lookup is not None:
            headers += lookup.headers()
        headers.append((b"content-length", str(len(payload)).encode()))
        await exchange.start(send, response.status, headers)
        await send({"type": "http.response.body", "body": payload})


async def replay(exchange: Exchange, lookup: Lookup, view: Cached, send: Send) -> None:
    """Answer from the cache: the stored reply, a stream as its stored events one by one
    (without the usage-only chunk for a client that did not ask for it)."""
    entry = lookup.entry
    assert entry is not None
    exchange.response_model, exchange.finish_reasons = entry.model, entry.finish_reasons
    headers = lookup.hit_headers()
    if not entry.streamed:
        headers.append((b"content-type", entry.content_type.encode("latin-1")))
        headers.append((b"content-length", b"%d" % len(entry.body)))
        await exchange.start(send, 200, headers)
        await send({"type": "http.response.body", "body": entry.body})
        return
    skip = -1 if isinstance(view, ResponsesRequest) or wants_usage(view) else entry.usage_at
    exchange.stream = True
    await exchange.start(send, 200, sse_headers(headers))
    for i, event in enumerate(entry.events):
        if i != skip:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            exchange.chunk(time.perf_counter())
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _entry_texts(lookup: Lookup) -> list[list[str]]:
    """The output text of a cached reply, one list per choice."""
    entry = lookup.entry
    assert entry is not None
    return stream_texts(entry.events) if entry.streamed else reply_texts(entry.body)


class PassthroughHandler(ApiHandler):
    """Any verb and subpath under the API's path, bodies streamed both ways (SPEC §4)."""

    async def __call__(
        self, exchange: Exchange, match: Match[Any], scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            identity = self.identify(exchange, scope)
        except UnknownKeyError as miss:
            identity = await self.identify_unknown(exchange, scope, miss)
        subpath = confine(match.subpath)
        exchange.backend_id = self.api.backend  # the member once one is chosen
        headers = b"".join(self.request_headers(scope, identity, exchange))
        query = self.query(scope, identity)
        watch: list[DisconnectWatch] = []
        body, length = self._body(scope, receive, watch, exchange)
        try:
            t = time.perf_counter()
            response = await self.route.send(
                exchange, exchange.method, subpath, query, headers, body, length
            )
            exchange.backend_seconds += time.perf_counter() - t
            if not watch:  # a body-less request: watch from here on
                watch.append(DisconnectWatch(receive, exchange))
            try:
                await exchange.start(send, response.status, response_headers_with_length(response))
                await relay_raw(response, send, exchange.add_backend_time)
            finally:
                response.close()
        finally:
            for w in watch:
                w.stop()

    def _body(
        self,
        scope: Scope,
        receive: Receive,
        watch: list[DisconnectWatch],
        exchange: Exchange,
    ) -> tuple[Body, int | None]:
        """The request body as the backend should receive it: None, or streamed (with the
        client's Content-Length when it declared one, else chunked)."""
        declared = header(scope, b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > self.max_body:
            raise RequestTooLargeError(self.max_body)
        chunked = header(scope, b"transfer-encoding") is not None
        if not length and not chunked:
            return None, None
        stream = self._stream_body(receive, watch, exchange, asyncio.current_task())
        return stream, None if chunked else length

    async def _stream_body(
        self,
        receive: Receive,
        watch: list[DisconnectWatch],
        exchange: Exchange,
        task: asyncio.Task[object] | None,
    ) -> AsyncIterator[bytes]:
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise RequestTooLargeError(self.max_body)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                watch.append(DisconnectWatch(receive, exchange, task))
                return


def response_headers_with_length(response: Response) -> Headers:
    """Passthrough relays the exact bytes, so the backend's Content-Length stays true."""
    headers = response_headers(response)
    length = response.header(b"content-length")
    if length is not None:
        headers.append((b"content-length", length))
    return headers
