"""The `tollway mock-llm` backend: an OpenAI-compatible mock for demos, tests and benchmarks.

Raw ASGI on Granian, built never to be the bottleneck of a benchmark: the JSON of a
non-streamed reply is cached per (model, tokens, prompt size) and only its id and timestamp
are formatted per request; every streamed token's SSE bytes are encoded once at start-up.

Operations (each at `/v1/<op>` and `/<op>`): `POST chat/completions`, `POST completions`,
`POST embeddings`, `POST responses`, `GET models`. A reply has `tokens` words, one word per
token (common English words, each a single token in OpenAI's encodings), capped by
`max_tokens` / `max_completion_tokens` / `max_output_tokens`. Streams wait `ttft_ms` before
the first token and `itl_ms` between tokens; non-streamed replies wait the same total.

Fault injection by request header:
  x-mock-status: N       reply with status N and an OpenAI-shaped error
  x-mock-retry-after: S  add `Retry-After: S` to that error
  x-mock-delay-ms: MS    wait before sending the response headers
  x-mock-close-after: N  send N SSE events (none for JSON) then abort the connection
  x-mock-garbage: 1      mix comments, junk lines and invalid JSON events into a stream
  x-mock-reply: TEXT     chat/completions, completions and responses answer TEXT (UTF-8, else
                         latin-1) instead of the usual words: split on single spaces, one token
                         per piece (later ones keep their leading space), so the streamed
                         deltas join to TEXT; capped and paced like the usual words

Sticky faults, for one process to play several failing backends: `PUT /_mock/faults` with a
JSON list of rules `{"faults": {"status": "503", "retry-after": "2"}, "when": {"x-member":
"a"}, "times": 3}` applies `faults` (the x-mock-* names without the prefix) to the requests
whose headers match every `when` pair (all requests without `when`), `times` times (for
ever without it); the first matching rule wins. `GET` lists the rules left, `DELETE` clears.

Observability: `GET /_mock/requests` lists the last 200 requests (newest last), each with
method, path, query, headers, body (first 64 KiB), status and monotonic timestamps
`started`, `finished` (the whole response was sent), `disconnected` (the client went away
first) and `events_sent`; `DELETE /_mock/requests` clears the list.

Content safety: the mock also plays Azure AI Content Safety under `/contentsafety/` (text
analysis by keywords, prompt shields, blocklists; see proxy/mock_safety.py), with the same
fault injection (rendered as Azure errors) and recording; `content_safety_key` makes it
demand `Ocp-Apim-Subscription-Key`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import math
import os
import re
import secrets
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from functools import lru_cache, partial
from typing import Any, NamedTuple

import msgspec

from proxy import mock_safety
from proxy.types import ASGIApp, Headers, Receive, Scope, Send

# Each is one token with a leading space in cl100k/o200k, so a tokenizer's count of the
# streamed text matches the usage the mock reports.
_SENTENCE = (
    "The model is a mock and this is what it says when you ask it for more of the same "
    "text that you can use to test how long one reply will be in time"
)
WORDS = tuple(_SENTENCE.split())
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "llama-3-8b")
RECORD_LIMIT = 200
BODY_RECORD_LIMIT = 64 * 1024
CONTENT_SAFETY_KEY_ENV = "TOLLWAY_MOCK_CONTENT_SAFETY_KEY"

_SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_CHAT_ROLE = (
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
)
_CHAT_FINISH = {
    reason: b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]}\n\n'
    % reason.encode()
    for reason in ("stop", "length")
}
_TEXT_FINISH = {
    reason: b'"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"%s"}]}\n\n'
    % reason.encode()
    for reason in ("stop", "length")
}
_GARBAGE = b": mock comment\n\ndata: {not json\n\ngarbage line without colon\n\n"
_CACHE_LIMIT = 4096


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = False


class _Part(msgspec.Struct):
    text: str | None = None


class _Message(msgspec.Struct):
    content: str | list[_Part] | None = None


class _Body(msgspec.Struct):
    """The request fields the mock reads, for every operation; the rest is ignored."""

    model: str = "mock-model"
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_output_tokens: int | None = None
    messages: list[_Message] = []
    prompt: Any = None
    input: Any = None
    instructions: str | None = None
    dimensions: int | None = None
    encoding_format: str | None = "float"


_decoder = msgspec.json.Decoder(_Body)
_encode = msgspec.json.encode


class _BadRequestError(Exception):
    """The request cannot be served; rendered as a 400."""


class _AbortError(Exception):
    """Raised on purpose so Granian aborts the connection mid-response (x-mock-close-after)."""


class _Json(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    tokens: int = 0  # how many generated tokens pacing should wait for


class _Stream(NamedTuple):
    """An SSE reply: events `prefix + part` (prefix made once per request), then `trailer`."""

    prefix: bytes
    parts: list[bytes]
    trailer: bytes
    lead: int  # events before the first token
    tokens: int

    def events(self) -> list[bytes]:
        events = [self.prefix + part for part in self.parts]
        return [*events, self.trailer] if self.trailer else events

    def body(self) -> bytes:
        """All events in one piece, joined without building each one."""
        if not self.parts:
            return self.trailer
        return self.prefix + self.prefix.join(self.parts) + self.trailer


class _Script:
    """The tokens of a reply with their SSE delta bytes: made once, or per x-mock-reply."""

    __slots__ = ("chat_deltas", "pieces", "text_deltas")

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.chat_deltas = [
            b'"choices":[{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]}'
            b"\n\n" % _encode(piece)
            for piece in pieces
        ]
        self.text_deltas = [
            b'"choices":[{"index":0,"text":%s,"logprobs":null,"finish_reason":null}]}\n\n'
            % _encode(piece)
            for piece in pieces
        ]

    @classmethod
    def of_text(cls, text: str) -> _Script:
        """`text` split on single spaces, each later token keeping its space: they join to it."""
        tokens = text.split(" ") if text else []
        return cls(tokens[:1] + [" " + token for token in tokens[1:]])

    def size(self, *caps: int | None) -> tuple[int, str]:
        """How many tokens to send under the first cap given, and the finish reason."""
        cap = next((c for c in caps if c is not None), None)
        if cap is not None and cap < len(self.pieces):
            return max(cap, 0), "length"
        return len(self.pieces), "stop"


_Reply = _Json | _Stream
_Op = Callable[[bytes, _Script | None], _Reply]  # the body, and the x-mock-reply script if any
_ErrorJson = Callable[[int, str, Headers | None], _Json]


_MODELS_REPLY = _Json(
    200,
    _encode(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "tollway-mock"}
                for m in MODELS
            ],
        }
    ),
)


class _Faults:
    """The x-mock-* headers of one request."""

    __slots__ = ("close_after", "delay", "garbage", "retry_after", "script", "status")

    def __init__(self) -> None:
        self.status = 0
        self.retry_after = b""
        self.delay = 0.0
        self.close_after: int | None = None
        self.garbage = False
        self.script: _Script | None = None

    def set(self, name: bytes, value: bytes) -> None:
        try:
            if name == b"status":
                self.status = int(value)
            elif name == b"retry-after":
                self.retry_after = value
            elif name == b"delay-ms":
                self.delay = float(value) / 1000
            elif name == b"close-after":
                self.close_after = int(value)
            elif name == b"garbage":
                self.garbage = value not in (b"", b"0", b"false")
            elif name == b"reply":
                self.script = _Script.of_text(_header_text(value))
        except ValueError:
            raise _BadRequestError(f"invalid x-mock-{name.decode()} header") from None

    def set_all(self, faults: dict[bytes, bytes]) -> None:
        for name, value in faults.items():
            self.set(name, value)


class _Rule:
    """A sticky fault rule (`PUT /_mock/faults`)."""

    __slots__ = ("faults", "times", "when")

    def __init__(self, spec: Any) -> None:
        if not isinstance(spec, dict) or not isinstance(spec.get("faults"), dict):
            raise _BadRequestError("a rule is an object with a faults object")
        self.faults = {str(k).encode(): str(v).encode() for k, v in spec["faults"].items()}
        _Faults().set_all(self.faults)  # refuse bad values now, not on every request
        when = spec.get("when") or {}
        self.when = {str(k).lower().encode(): str(v).encode() for k, v in when.items()}
        times = spec.get("times")
        self.times: int | None = None if times is None else int(times)

    def matches(self, headers: Headers) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        found = dict(headers) if self.when else {}
        return all(found.get(name) == value for name, value in self.when.items())

    def to_builtins(self) -> dict[str, Any]:
        return {
            "faults": {k.decode(): v.decode() for k, v in self.faults.items()},
            "when": {k.decode(): v.decode() for k, v in self.when.items()},
            "times": self.times,
        }


def _header_text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _parse_faults(headers: Headers) -> _Faults | None:
    faults = None
    for name, value in headers:
        if name.startswith(b"x-mock-"):
            faults = faults or _Faults()
            faults.set(name[7:], value)
    return faults


class _Record:
    """What the mock saw of one request and how far it got answering it."""

    __slots__ = (
        "body",
        "disconnected",
        "events_sent",
        "finished",
        "headers",
        "method",
        "path",
        "query",
        "started",
        "status",
    )

    def __init__(self, scope: Scope, body: bytes) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope["query_string"]
        self.headers: Headers = list(scope["headers"])
        self.body = body[:BODY_RECORD_LIMIT]
        self.status = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self.disconnected: float | None = None
        self.events_sent = 0

    def to_builtins(self) -> dict[str, Any]:
        """The record as JSON-ready values (decoded lazily, off the hot path)."""
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "body": self.body.decode("utf-8", "replace"),
            "status": self.status,
            "started": self.started,
            "finished": self.finished,
            "disconnected": self.disconnected,
            "events_sent": self.events_sent,
        }


def _error_json(status: int, message: str, headers: Headers | None = None) -> _Json:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = _encode({"error": {"message": message, "type": kind, "code": None}})
    return _Json(status, body, tuple(headers or ()))


def _azure_error_json(status: int, message: str, headers: Headers | None = None) -> _Json:
    """An error in Azure's shape, for the content-safety routes."""
    answer = mock_safety.error(status, message)
    return _Json(status, answer.body, tuple(headers or ()))


def _not_routed(scope: Scope, methods: dict[str, Any] | None) -> _Json:
    if methods is None:
        return _error_json(404, f"no such operation: {scope['method']} {scope['path']}")
    allow = [(b"allow", ", ".join(methods).encode())]
    return _error_json(405, f"method {scope['method']} not allowed", allow)


def _injected_error(faults: _Faults, error: _ErrorJson) -> _Json:
    headers = [(b"retry-after", faults.retry_after)] if faults.retry_after else []
    return error(faults.status, f"mock error {faults.status}", headers)


def _json_headers(body: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> Headers:
    return [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *extra]


def _decode(raw: bytes) -> _Body:
    try:
        return _decoder.decode(raw)
    # ValidationError is a DecodeError; msgspec checks UTF-8 only in the strings it makes
    # (UnicodeDecodeError), and deep nesting exhausts the recursion limit.
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _BadRequestError(f"invalid request body: {type(exc).__name__}") from None


def _count_words(value: Any) -> int:
    """A cheap deterministic token estimate: words, token ids, +3 per message item."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_count_words(item) for item in value)
    if isinstance(value, dict):
        if "content" in value:
            return 3 + _count_words(value["content"])
        return _count_words(value.get("text"))
    return 0


def _chat_prompt_tokens(messages: list[_Message]) -> int:
    count = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            count += 3 + len(content.split())
        else:
            count += 3 + sum(len(p.text.split()) for p in content or () if p.text)
    return max(count, 1)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


class MockLLM:
    """The mock backend as an ASGI app; see the module docstring for what it serves."""

    def __init__(
        self,
        *,
        ttft_ms: float,
        itl_ms: float,
        tokens: int,
        embedding_dim: int,
        content_safety_key: str | None = None,
    ) -> None:
        self._ttft = ttft_ms / 1000
        self._itl = itl_ms / 1000
        self._paced = ttft_ms > 0 or itl_ms > 0
        self._embedding_dim = embedding_dim
        pieces = [WORDS[0]] + [" " + WORDS[i % len(WORDS)] for i in range(1, tokens)]
        self._script = _Script(pieces[:tokens])
        self._safety = mock_safety.ContentSafety(content_safety_key)
        self._tails: dict[tuple[Any, ...], bytes] = {}
        self._id_prefix = secrets.token_hex(4).encode()
        self._ids = itertools.count(1)
        self._records: deque[_Record] = deque(maxlen=RECORD_LIMIT)
        self._rules: list[_Rule] = []
        self._routes = self._build_routes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._route(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    def _build_routes(self) -> dict[str, dict[str, Callable[..., Awaitable[None]]]]:
        ops: dict[str, tuple[str, _Op]] = {
            "chat/completions": ("POST", self._chat),
            "completions": ("POST", self._completions),
            "embeddings": ("POST", self._embeddings),
            "responses": ("POST", self._responses),
            "models": ("GET", lambda raw, script: _MODELS_REPLY),
        }
        routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {}
        for path, (method, op) in ops.items():
            handler = partial(self._serve, op=op)
            routes["/v1/" + path] = routes["/" + path] = {method: handler}
        routes["/_mock/requests"] = {"GET": self._list_records, "DELETE": self._clear_records}
        routes["/_mock/faults"] = {
            "GET": self._list_rules, "PUT": self._set_rules, "DELETE": self._set_rules,
        }  # fmt: skip
        return routes

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self._routes.get(scope["path"])
        handler = methods.get(scope["method"]) if methods else None
        if handler is None:
            handler = self._unrouted(scope, methods)
        await handler(scope, receive, send)

    def _unrouted(
        self, scope: Scope, methods: dict[str, Any] | None
    ) -> Callable[..., Awaitable[None]]:
        """Content safety (by prefix), else a fixed 404/405 served and recorded like an op."""
        if methods is None and scope["path"].startswith(mock_safety.PREFIX):
            return partial(
                self._serve, op=partial(self._content_safety, scope), error=_azure_error_json
            )
        reply = _not_routed(scope, methods)
        return partial(self._serve, op=lambda raw, script: reply)

    async def _list_records(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(scope, receive)
        await _send_json(send, _Json(200, _encode([r.to_builtins() for r in self._records])))

    async def _clear_records(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(scope, receive)
        self._records.clear()
        await _send_json(send, _Json(200, b"{}"))

    async def _list_rules(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(scope, receive)
        await _send_json(send, _Json(200, _encode([r.to_builtins() for r in self._rules])))

    async def _set_rules(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(scope, receive)
        try:
            specs = msgspec.json.decode(raw) if scope["method"] == "PUT" else []
            if not isinstance(specs, list):
                raise _BadRequestError("expected a JSON list of rules")
            self._rules = [_Rule(spec) for spec in specs]
        except (msgspec.DecodeError, _BadRequestError, TypeError, ValueError) as exc:
            await _send_json(send, _error_json(400, str(exc)))
            return
        await _send_json(send, _Json(200, b"{}"))

    def _sticky_faults(self, headers: Headers, faults: _Faults | None) -> _Faults | None:
        for rule in self._rules:
            if rule.matches(headers):
                if rule.times is not None:
                    rule.times -= 1
                faults = faults or _Faults()
                faults.set_all(rule.faults)
                return faults
        return faults

    # -- serving: fast path, faults, pacing, disconnect watch ----------------------------------

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        op: _Op,
        error: _ErrorJson = _error_json,
    ) -> None:
        raw = await _read_body(scope, receive)
        record = _Record(scope, raw)
        self._records.append(record)
        try:
            faults = _parse_faults(scope["headers"])
            if self._rules:
                faults = self._sticky_faults(scope["headers"], faults)
            if faults is None:
                reply = op(raw, None)
            else:
                reply = _injected_error(faults, error) if faults.status else op(raw, faults.script)
        except _BadRequestError as exc:
            faults, reply = None, error(400, str(exc), None)
        record.status = reply.status if isinstance(reply, _Json) else 200
        if faults is None and not (self._paced and reply.tokens):
            await self._send_at_once(send, reply, record)
        else:
            await _watch_disconnect(self._send_slowly(send, reply, record, faults), receive, record)

    async def _send_at_once(self, send: Send, reply: _Reply, record: _Record) -> None:
        if isinstance(reply, _Json):
            await _send_json(send, reply)
        else:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await send({"type": "http.response.body", "body": reply.body()})
            record.events_sent = len(reply.parts) + bool(reply.trailer)
        record.finished = time.monotonic()

    async def _send_slowly(
        self, send: Send, reply: _Reply, record: _Record, faults: _Faults | None
    ) -> None:
        faults = faults or _Faults()
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if isinstance(reply, _Stream):
            await self._pump(send, reply, record, faults)
        else:
            await self._send_json_slowly(send, reply, faults)
        record.finished = time.monotonic()

    async def _send_json_slowly(self, send: Send, reply: _Json, faults: _Faults) -> None:
        if reply.tokens:
            await asyncio.sleep(self._ttft + self._itl * (reply.tokens - 1))
        if faults.close_after is None:
            await _send_json(send, reply)
            return
        # Granian holds back the response start until the first body message: send half.
        headers = _json_headers(reply.body, reply.headers)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        half = reply.body[: len(reply.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise _AbortError("x-mock-close-after")

    async def _pump(self, send: Send, stream: _Stream, record: _Record, faults: _Faults) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        events = stream.events()
        if faults.garbage:  # junk after the first event and before the last, pacing unchanged
            events = [events[0] + _GARBAGE, *events[1:-1], _GARBAGE + events[-1]]
        end = len(events) if faults.close_after is None else min(faults.close_after, len(events))
        for index in range(end):
            delay = self._delay_before(index, stream)
            if delay:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": events[index], "more_body": True})
            record.events_sent += 1
        if faults.close_after is not None:
            raise _AbortError("x-mock-close-after")
        await send({"type": "http.response.body", "body": b""})

    def _delay_before(self, index: int, stream: _Stream) -> float:
        # The first token (with the events leading up to it) after ttft, later tokens after itl.
        if index == 0:
            return self._ttft
        if stream.lead < index < stream.lead + stream.tokens:
            return self._itl
        return 0.0

    # -- operations: request bytes -> reply ----------------------------------------------------

    def _new_id(self) -> bytes:
        return b"%s%x" % (self._id_prefix, next(self._ids))

    def _cached_tail(
        self, key: tuple[Any, ...], build: Callable[[], dict[str, Any]], script: _Script
    ) -> bytes:
        """JSON of `build()` without its opening brace, cached: only id/created vary per call.

        Only replies of the usual words are cached; an x-mock-reply one is built each time.
        """
        if script is not self._script:
            return _encode(build())[1:]
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) >= _CACHE_LIMIT:
                self._tails.clear()
            tail = self._tails[key] = _encode(build())[1:]
        return tail

    def _chat(self, raw: bytes, script: _Script | None) -> _Reply:
        body = _decode(raw)
        script = script or self._script
        n, finish = script.size(body.max_completion_tokens, body.max_tokens)
        prompt = _chat_prompt_tokens(body.messages)
        if body.stream:
            return self._chat_stream(body, script, n, finish, prompt)
        tail = self._cached_tail(
            ("chat", body.model, n, finish, prompt),
            lambda: {
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(script.pieces[:n]),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(prompt, n),
            },
            script,
        )
        head = b'{"id":"chatcmpl-%s","object":"chat.completion","created":%d,'
        return _Json(200, head % (self._new_id(), time.time()) + tail, tokens=n)

    def _chat_stream(
        self, body: _Body, script: _Script, n: int, finish: str, prompt: int
    ) -> _Stream:
        prefix = (
            b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,'
            b'"model":%s,' % (self._new_id(), time.time(), _encode(body.model))
        )
        parts = [_CHAT_ROLE, *script.chat_deltas[:n], _CHAT_FINISH[finish]]
        return _Stream(prefix, self._with_usage(parts, body, prompt, n), _DONE, 1, n)

    def _completions(self, raw: bytes, script: _Script | None) -> _Reply:
        body = _decode(raw)
        script = script or self._script
        n, finish = script.size(body.max_tokens)
        prompt = max(_count_words(body.prompt), 1)
        if body.stream:
            return self._completions_stream(body, script, n, finish, prompt)
        tail = self._cached_tail(
            ("text", body.model, n, finish, prompt),
            lambda: {
                "model": body.model,
                "choices": [
                    {
                        "text": "".join(script.pieces[:n]),
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(prompt, n),
            },
            script,
        )
        head = b'{"id":"cmpl-%s","object":"text_completion","created":%d,'
        return _Json(200, head % (self._new_id(), time.time()) + tail, tokens=n)

    def _completions_stream(
        self, body: _Body, script: _Script, n: int, finish: str, prompt: int
    ) -> _Stream:
        prefix = b'data: {"id":"cmpl-%s","object":"text_completion","created":%d,"model":%s,' % (
            self._new_id(),
            time.time(),
            _encode(body.model),
        )
        parts = [*script.text_deltas[:n], _TEXT_FINISH[finish]]
        return _Stream(prefix, self._with_usage(parts, body, prompt, n), _DONE, 0, n)

    @staticmethod
    def _with_usage(parts: list[bytes], body: _Body, prompt: int, n: int) -> list[bytes]:
        if body.stream_options and body.stream_options.include_usage:
            parts.append(b'"choices":[],"usage":%s}\n\n' % _encode(_usage(prompt, n)))
        return parts

    def _embeddings(self, raw: bytes, script: _Script | None) -> _Reply:
        body = _decode(raw)
        texts = _embedding_texts(body.input)
        dim = self._embedding_dim if body.dimensions is None else body.dimensions
        if not 0 < dim <= 8192:
            raise _BadRequestError("dimensions must be between 1 and 8192")
        if body.encoding_format not in (None, "float", "base64"):
            raise _BadRequestError("encoding_format must be 'float' or 'base64'")
        encode = _as_base64 if body.encoding_format == "base64" else list
        data = [
            {"object": "embedding", "index": i, "embedding": encode(embed(text, dim))}
            for i, text in enumerate(texts)
        ]
        prompt = max(_count_words(body.input), 1)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return _Json(
            200, _encode({"object": "list", "data": data, "model": body.model, "usage": usage})
        )

    def _responses(self, raw: bytes, script: _Script | None) -> _Reply:
        body = _decode(raw)
        script = script or self._script
        n, finish = script.size(body.max_output_tokens)
        prompt = max(_count_words(body.input) + _count_words(body.instructions), 1)
        ids = self._new_id().decode()
        made = _ResponseMaker(body, ids, finish == "length", prompt, script.pieces[:n])
        if body.stream:
            return _Stream(b"", made.events(), b"", 4, n)
        return _Json(200, _encode(made.response(final=True)), tokens=n)

    def _content_safety(self, scope: Scope, raw: bytes, script: _Script | None) -> _Reply:
        answer = self._safety.answer(
            scope["method"], scope["path"], scope["query_string"], scope["headers"], raw
        )
        return _Json(answer.status, answer.body, answer.headers)


class _ResponseMaker:
    """Builds one Responses API reply: the `response` object or its typed event stream."""

    def __init__(self, body: _Body, ids: str, capped: bool, prompt: int, pieces: list[str]) -> None:
        self.body, self.pieces, self.prompt = body, pieces, prompt
        self.rid, self.mid = "resp_" + ids, "msg_" + ids
        self.status = "incomplete" if capped else "completed"
        self.text = "".join(pieces)
        self.created = int(time.time())
        self.sequence = itertools.count()

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, final: bool) -> dict[str, Any]:
        return {
            "id": self.mid,
            "type": "message",
            "role": "assistant",
            "status": self.status if final else "in_progress",
            "content": [self.part(self.text)] if final else [],
        }

    def response(self, final: bool) -> dict[str, Any]:
        """The `response` object, in progress (no output) or final."""
        n = len(self.pieces)
        usage = {
            "input_tokens": self.prompt,
            "output_tokens": n,
            "total_tokens": self.prompt + n,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        capped = self.status == "incomplete"
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": self.status if final else "in_progress",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if final and capped else None,
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "model": self.body.model,
            "output": [self.item(final=True)] if final else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage if final else None,
            "user": None,
            "metadata": {},
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(self.sequence), **fields}
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), _encode(data))

    def events(self) -> list[bytes]:
        """The whole stream; the first 4 events lead up to the first text delta."""
        at = {"item_id": self.mid, "output_index": 0, "content_index": 0}
        last = "response.incomplete" if self.status == "incomplete" else "response.completed"
        return [
            self.event("response.created", response=self.response(final=False)),
            self.event("response.in_progress", response=self.response(final=False)),
            self.event("response.output_item.added", output_index=0, item=self.item(False)),
            self.event("response.content_part.added", **at, part=self.part("")),
            *[
                self.event("response.output_text.delta", **at, delta=p, logprobs=[])
                for p in self.pieces
            ],
            self.event("response.output_text.done", **at, text=self.text, logprobs=[]),
            self.event("response.content_part.done", **at, part=self.part(self.text)),
            self.event("response.output_item.done", output_index=0, item=self.item(True)),
            self.event(last, response=self.response(final=True)),
        ]


# -- embeddings: hashing trick over words and character trigrams --------------------------------

_WORD = re.compile(r"\w+")


def _embedding_texts(value: Any) -> list[str]:
    """`input` as a list of texts; token ids become words so equal ids embed equally."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) for v in value):
            return [" ".join(f"t{v}" for v in value)]
        if all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in value):
            return [" ".join(f"t{i}" for i in v) for v in value]
    raise _BadRequestError("input must be a string, a list of strings or of token ids")


@lru_cache(maxsize=4096)
def embed(text: str, dim: int) -> tuple[float, ...]:
    """A deterministic unit vector whose cosine similarity tracks word and spelling overlap."""
    vector = [0.0] * dim
    words = _WORD.findall(text.lower())
    for word in words:
        _add_feature(vector, word, 1.0)
    padded = f" {' '.join(words)} "
    for i in range(len(padded) - 2):
        _add_feature(vector, "#" + padded[i : i + 3], 0.5)
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:  # empty text: any fixed unit vector will do
        return (1.0,) + (0.0,) * (dim - 1)
    return tuple(x / norm for x in vector)


def _add_feature(vector: list[float], feature: str, weight: float) -> None:
    # crc32, not hash(): Python salts str hashes per process, and embeddings must be stable.
    h = zlib.crc32(feature.encode())
    vector[h % len(vector)] += weight if h & 0x80000000 else -weight


def _as_base64(vector: tuple[float, ...]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# -- ASGI plumbing ------------------------------------------------------------------------------


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    # Granian hands over the body with more_body=True and then an empty last message; when
    # Content-Length says the body is complete, skip that receive: it costs ~15 us a request.
    parts, size, declared = [body], len(body), _content_length(scope)
    while message.get("more_body") and size != declared:
        message = await receive()
        parts.append(message.get("body", b""))
        size += len(parts[-1])
    return b"".join(parts)


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else -1
    return -1


async def _send_json(send: Send, reply: _Json) -> None:
    headers = _json_headers(reply.body, reply.headers)
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _watch_disconnect(
    responding: Coroutine[Any, Any, None], receive: Receive, record: _Record
) -> None:
    """Run `responding` until it ends or the client goes away, whichever is first.

    Granian implements ASGI 2.3, where sending to a gone client does not raise, so only
    `receive()` tells us: https://asgi.readthedocs.io/en/latest/specs/www.html#disconnect
    """
    task = asyncio.ensure_future(responding)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        task.result()  # re-raises _AbortError so Granian drops the connection
        return
    record.disconnected = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- entry points -------------------------------------------------------------------------------


def create_app(
    *,
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    tokens: int = 16,
    embedding_dim: int = 256,
    content_safety_key: str | None = None,
) -> ASGIApp:
    """Build the mock backend ASGI app (see the module docstring).

    With `content_safety_key`, the content-safety routes demand it in
    `Ocp-Apim-Subscription-Key`; without, they accept any request.
    """
    return MockLLM(
        ttft_ms=ttft_ms,
        itl_ms=itl_ms,
        tokens=tokens,
        embedding_dim=embedding_dim,
        content_safety_key=content_safety_key,
    )


def app_factory() -> ASGIApp:
    """The app configured from the environment (Granian): TOLLWAY_MOCK_{TTFT_MS,ITL_MS,TOKENS}
    and TOLLWAY_MOCK_CONTENT_SAFETY_KEY (unset or empty: no key)."""
    env = os.environ
    return create_app(
        ttft_ms=float(env.get("TOLLWAY_MOCK_TTFT_MS", "0")),
        itl_ms=float(env.get("TOLLWAY_MOCK_ITL_MS", "0")),
        tokens=int(env.get("TOLLWAY_MOCK_TOKENS", "16")),
        content_safety_key=env.get(CONTENT_SAFETY_KEY_ENV) or None,
    )


def run(
    *,
    host: str = "127.0.0.1",
    port: int = 9000,
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    tokens: int = 16,
    workers: int = 1,
    content_safety_key: str | None = None,
) -> None:
    """Serve the mock with Granian until interrupted.

    Each worker keeps its own `/_mock/requests` list and content-safety blocklists; tests
    want `workers=1`. `content_safety_key` as for `create_app`.
    """
    from granian import Granian  # imported here so the app itself can be used without it

    os.environ["TOLLWAY_MOCK_TTFT_MS"] = str(ttft_ms)
    os.environ["TOLLWAY_MOCK_ITL_MS"] = str(itl_ms)
    os.environ["TOLLWAY_MOCK_TOKENS"] = str(tokens)
    os.environ[CONTENT_SAFETY_KEY_ENV] = content_safety_key or ""
    Granian(
        "proxy.mock_llm:app_factory",
        address=host,
        port=port,
        interface="asgi",  # type: ignore[arg-type]  # a str enum; the plain value is accepted
        loop="uvloop",  # type: ignore[arg-type]
        workers=workers,
        factory=True,
        backlog=4096,
        backpressure=20_000,  # paced-stream benches hold thousands of requests open
        log_access=False,
    ).serve()
