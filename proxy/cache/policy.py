"""`llm-semantic-cache-lookup` / `llm-semantic-cache-store` (SPEC §6): answer a request from a
stored reply to a similar enough earlier one, and keep complete replies for later.

A lookup embeds the request's text and asks the index for the nearest entry within
`score-threshold` (cosine distance) in the request's partition. The partition is a digest of
what must match exactly for a stored answer to be this request's answer:

- the API, the operation, whether the reply streams, and the embedder (vectors of two
  embedders are not comparable);
- every request parameter besides the conversation itself: model, temperature, max_tokens,
  tools, response_format, n, ... (`stream_options` and `user` excepted; for the Responses API
  the conversation is `input`, and `instructions` and `stream_options` stay in), so a request
  asking for JSON never gets a prose answer, nor a 5-token one a truncated 5-token reply;
- the caller's subscription, unless `share-across-subscriptions: true`: one tenant never
  receives another's answer unless configured so;
- the rendered `vary-by` templates.

What is embedded: the messages (without system and developer ones with
`ignore-system-messages`), one message as its text, several as `role: text` lines; a
completions prompt as it is; a Responses `input` string, or its message items as messages
(`instructions` counts as a system message). Skipped (no lookup, nothing stored,
`x-cache: SKIP`): more than `max-message-count` messages (counted after system messages are
left out), image, audio or file parts, a prompt list, an empty text; Responses items other
than messages (function calls and outputs, reasoning, ...), and a Responses request whose
answer depends on state the backend keeps (`previous_response_id`, `conversation`, a stored
`prompt`).

A lookup is bounded by `timeout`: an embedder or index that fails or is slow makes it a miss
(`CacheUnavailableError`), logged once per outage and counted (`tollway.cache.errors`), and
the request goes on. A miss keeps the vector: when the reply turns out complete (a 200 JSON
reply, or a stream that reached `data: [DONE]`; for the Responses API one whose status is
`completed`, or a stream that reached `response.completed`), it is stored under that vector for
`duration`, in a background task after the response went out. Nothing of this runs for APIs
without a lookup policy: their handler holds no cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import msgspec

from proxy.cache import entry as entries
from proxy.cache.base import CacheBusyError, CacheUnavailableError, Embedder, Vector, VectorIndex
from proxy.cache.entry import Entry
from proxy.config import Api, CacheLookup, CacheStore, Config, PolicyEntry, parse_template
from proxy.exchange import Exchange
from proxy.policies.templates import Template, render
from proxy.relay import StreamFilter
from proxy.schemas import (
    JSON_ERRORS,
    SYSTEM_ROLES,
    ChatRequest,
    CompletionRequest,
    Message,
    Reply,
    ResponsesRequest,
)
from proxy.telemetry import genai
from proxy.telemetry.metrics import Counter, Registry
from proxy.types import Headers, Scope

log = logging.getLogger("tollway")

LOOKUPS = genai.CACHE_LOOKUPS  # by API and result: hit, miss, skip, error
ERRORS = genai.CACHE_ERRORS  # by stage (lookup, store) and error.type (the kinds below)
RESULT = "tollway.cache.result"
STAGE = "tollway.cache.stage"
# error.type of a cache failure: no answer within the cache's own timeout; an embedder or
# index that failed or refused (CacheUnavailableError); a store the index dropped, too far
# behind (CacheBusyError); an unexpected exception (a bug, logged with its traceback).
TIMEOUT, UNAVAILABLE, BUSY, INTERNAL = "timeout", "unavailable", "busy", "internal"
DISTANCE = "tollway.cache.distance"
MAX_ENTRY_BYTES = 1 << 20  # a reply larger than this is not kept
# Request fields that do not change the answer: not part of the partition. A Responses
# stream is replayed as stored, so its `stream_options` (include_obfuscation) must match.
_NOT_PARAMETERS = frozenset({"messages", "prompt", "stream", "stream_options", "user"})
_NOT_RESPONSES_PARAMETERS = frozenset({"input", "stream", "user"})
# Responses fields naming state the backend keeps: the answer is not the request's alone.
_BACKEND_STATE = ("previous_response_id", "conversation", "prompt")
_TEXT_PARTS = frozenset({"input_text", "output_text"})
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])

Cached = ChatRequest | CompletionRequest | ResponsesRequest  # the requests a cache serves
Fields = Mapping[str, msgspec.Raw]  # a request's top-level fields, undecoded

HIT, MISS, SKIP, ERROR = "hit", "miss", "skip", "error"
_HEADER = {HIT: b"HIT", MISS: b"MISS", SKIP: b"SKIP", ERROR: b"MISS"}
_EVENTS = {result: f"tollway.cache.{result}" for result in (MISS, SKIP, ERROR)}


class Outage:
    """One log line when a cache part stops answering, one when it answers again."""

    __slots__ = ("down",)

    def __init__(self) -> None:
        self.down: set[str] = set()

    def failed(self, part: str, why: str) -> None:
        if part not in self.down:
            self.down.add(part)
            log.warning("tollway: semantic cache %s unavailable (%s): requests go on as "
                        "misses until it answers again", part, why)  # fmt: skip

    def answered(self, part: str) -> None:
        if self.down and part in self.down:
            self.down.discard(part)
            log.warning("tollway: semantic cache %s answers again", part)


class CacheMetrics:
    """The cache's counters (no-ops without telemetry)."""

    __slots__ = ("errors", "lookups")

    def __init__(self, registry: Registry | None):
        self.lookups: Counter | None = None
        self.errors: Counter | None = None
        if registry is not None:
            self.lookups = registry.counter(
                LOOKUPS, "{lookup}", "Semantic-cache lookups by API and result.",
                ("tollway.api.id", RESULT),
            )  # fmt: skip
            self.errors = registry.counter(
                ERRORS, "{error}", "Semantic-cache embedder or index failures (fail-open).",
                (STAGE, genai.ERROR_TYPE),
            )  # fmt: skip

    def lookup(self, api_id: str, result: str) -> None:
        if self.lookups is not None:
            self.lookups.add(1, (api_id, result))

    def error(self, stage: str, kind: str) -> None:
        if self.errors is not None:
            self.errors.add(1, (stage, kind))


class Lookup:
    """One request's lookup: its result and, for a miss that may be stored, what to store it
    under and the stream events seen so far."""

    __slots__ = ("cache", "distance", "done", "entry", "events", "partition", "responses",
                 "result", "size", "vector")  # fmt: skip

    def __init__(self, cache: SemanticCache, result: str, responses: bool = False):
        self.cache = cache
        self.result = result
        self.responses = responses  # a Responses API request (else chat or completions)
        self.entry: Entry | None = None
        self.distance = 0.0
        self.partition = ""
        self.vector: Vector | None = None
        self.events: list[bytes] | None = None
        self.size = 0
        self.done = False  # the stream reached data: [DONE] (Responses: response.completed)

    def headers(self) -> Headers:
        return [(b"x-cache", _HEADER[self.result])]

    def hit_headers(self) -> Headers:
        return [(b"x-cache", b"HIT"), (b"x-cache-distance", b"%.4f" % self.distance)]

    @property
    def storable(self) -> bool:
        return self.vector is not None and self.cache.store is not None

    def recording(
        self, keep: Callable[[bytes], bool], stream_filter: StreamFilter
    ) -> Callable[[bytes], bool]:
        """`keep` that also records the events of the reply (the usage-only chunk too,
        which the filter may drop for this client but a later client may want)."""
        if not self.storable:
            return keep
        events = self.events = []
        ends = entries.completes_response if self.responses else entries.completes

        def record(event: bytes) -> bool:
            dropped = stream_filter.dropped
            kept = keep(event)
            if events is self.events and (kept or stream_filter.dropped == dropped):
                self.size += len(event)
                if self.size > MAX_ENTRY_BYTES:
                    self.events = None  # too large to keep: stop recording
                else:
                    events.append(event)
                    if ends(event):
                        self.done = True
            return kept

        return record

    def stream_ended(self, stream_filter: StreamFilter) -> None:
        """The relay returned: store the stream if it completed (a chat stream with its
        finish reasons; a Responses stream has none, `response.completed` says it all)."""
        events = self.events
        if events is None or not self.done:
            return
        if not self.responses and not stream_filter.finish_reasons:
            return
        model, reasons = stream_filter.model, stream_filter.finish_reasons
        self.cache.store_soon(self, lambda: entries.stream(events, model, reasons))

    def whole_sent(
        self, status: int, content_type: str, payload: bytes, reply: Reply | None
    ) -> None:
        """A whole reply went out: store it if it is a complete 200 JSON reply."""
        if (
            not self.storable
            or status != 200
            or reply is None
            or content_type != "application/json"
            or len(payload) > MAX_ENTRY_BYTES
            or (self.responses and not entries.is_complete_response(payload))
        ):
            return
        _, model, reasons = reply
        self.cache.store_soon(self, lambda: entries.whole(payload, content_type, model, reasons))


class SemanticCache:
    """One pipeline's compiled lookup (and store, when it has one)."""

    def __init__(
        self,
        spec: CacheLookup,
        store: CacheStore | None,
        embedder: Embedder,
        index: VectorIndex,
        metrics: CacheMetrics,
        outage: Outage,
    ):
        self.spec = spec
        self.store = store if store is not None and store.cache_response else None
        self.embedder = embedder
        self.index = index
        self.metrics = metrics
        self.outage = outage
        self._vary: tuple[Template, ...] = tuple(parse_template(t) for t in spec.vary_by)
        self._timeout = float(spec.timeout)
        self._ttl = float(store.duration) if store is not None else 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def lookup(
        self,
        view: Cached,
        body: bytes,
        exchange: Exchange,
        scope: Scope,
        subscription_name: str,
    ) -> Lookup:
        """Look the request up; never raises for the cache's own failures."""
        try:
            fields = _fields_decoder.decode(body)
        except JSON_ERRORS:  # decode_request accepted it, so this does not happen
            fields = {}
        text = self.text(view, fields)
        if text is None:
            return self._done(Lookup(self, SKIP), exchange)
        found = Lookup(self, MISS, isinstance(view, ResponsesRequest))
        found.partition = self.partition(view, fields, exchange, scope, subscription_name)
        t = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                try:  # the embedder's time is a backend's, not the gateway's overhead
                    found.vector = (await self.embedder.embed([text]))[0]
                finally:
                    exchange.backend_seconds += time.perf_counter() - t
                nearest = await self.index.nearest(
                    found.partition, found.vector, self.spec.score_threshold
                )
        except (CacheUnavailableError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self._timeout:g} s"
            self.outage.failed("lookup", why)
            self.metrics.error("lookup", _kind(exc))
            found.vector, found.result = None, ERROR
            return self._done(found, exchange)
        self.outage.answered("lookup")
        if nearest is not None:
            cached = entries.decode(nearest[0])
            if cached is not None and cached.streamed == bool(view.stream):
                found.result, found.entry, found.distance = HIT, cached, nearest[1]
        return self._done(found, exchange)

    def _done(self, found: Lookup, exchange: Exchange) -> Lookup:
        self.metrics.lookup(exchange.api_id, found.result)
        exchange.cache = found.result
        if found.result == HIT:
            exchange.event("tollway.cache.hit", ((DISTANCE, found.distance),))
        else:
            exchange.event(_EVENTS[found.result])
        return found

    def text(self, view: Cached, fields: Fields) -> str | None:
        """What is embedded, or None when the request is skipped (`fields`: the request's
        top-level fields, where a Responses request names state the backend keeps)."""
        if isinstance(view, CompletionRequest):
            prompt: object = view.prompt
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            return prompt if isinstance(prompt, str) and prompt.strip() else None
        if isinstance(view, ResponsesRequest):
            messages = _input_messages(view, fields)
            if messages is None:
                return None
        else:
            messages = view.messages
        if self.spec.ignore_system_messages:
            messages = [m for m in messages if m.role not in SYSTEM_ROLES]
        if not messages or len(messages) > self.spec.max_message_count:
            return None
        if len(messages) == 1:
            text = _message_text(messages[0])
        else:
            lines = [_message_text(m) for m in messages]
            if any(line is None for line in lines):
                return None
            text = "\n".join(f"{m.role}: {line}" for m, line in zip(messages, lines, strict=True))
        return text if text is not None and text.strip() else None

    def partition(
        self,
        view: Cached,
        fields: Fields,
        exchange: Exchange,
        scope: Scope,
        subscription_name: str,
    ) -> str:
        digest = hashlib.blake2b(digest_size=16)
        stream = b"stream" if view.stream else b"whole"
        head = (exchange.api_id, exchange.operation, self.embedder.name)
        digest.update("\x1f".join(head).encode() + b"\x1f" + stream)
        excluded = (
            _NOT_RESPONSES_PARAMETERS if isinstance(view, ResponsesRequest) else _NOT_PARAMETERS
        )
        for name in sorted(fields):
            if name not in excluded:
                digest.update(b"\x1e%s\x1f%s" % (name.encode(), bytes(fields[name])))
        if not self.spec.share_across_subscriptions:
            digest.update(b"\x1dsubscription\x1f" + exchange.subscription_id.encode())
        for template in self._vary:
            value = render(template, exchange, scope, subscription_name)
            digest.update(b"\x1dvary\x1f" + value.encode())
        return digest.hexdigest()

    def store_soon(self, found: Lookup, make: Callable[[], Entry]) -> None:
        """Store in the background: the response has gone out (or is going) already."""
        task = asyncio.get_running_loop().create_task(self._store(found, make))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, found: Lookup, make: Callable[[], Entry]) -> None:
        assert found.vector is not None
        try:
            payload = entries.encode(make())
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await self.index.add(found.partition, found.vector, payload, self._ttl)
        except CacheBusyError:
            self.metrics.error("store", BUSY)  # the index logs it
            return
        except (CacheUnavailableError, TimeoutError) as exc:
            self.outage.failed("store", str(exc) or "no answer in time")
            self.metrics.error("store", _kind(exc))
            return
        except Exception:  # a bug must not become an unobserved task exception
            log.exception("tollway: semantic cache store failed")
            self.metrics.error("store", INTERNAL)
            return
        self.outage.answered("store")

    async def drain(self) -> None:
        """Wait for the stores under way (a retiring runtime, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _kind(exc: Exception) -> str:
    """The error.type of a failed lookup or store (the cache's own timeout, or the rest)."""
    return TIMEOUT if isinstance(exc, TimeoutError) else UNAVAILABLE


def _message_text(message: Message) -> str | None:
    """A message's text; None for content the text cannot stand for (images, audio)."""
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for part in content:
            if part.type not in ("text", "input_text") or part.text is None:
                return None
            parts.append(part.text)
        text = "\n".join(parts)
    if message.tool_calls:
        text += "\n" + "\n".join(
            bytes(call).decode("utf-8", "replace") for call in message.tool_calls
        )
    return text


class _InputPart(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _InputItem(msgspec.Struct):
    """A Responses input item as far as the cache reads it: a message, or another type."""

    type: str = "message"
    role: str = ""
    content: str | list[_InputPart] | None = None


_item_decoder = msgspec.json.Decoder(_InputItem)


def _input_messages(view: ResponsesRequest, fields: Fields) -> list[Message] | None:
    """A Responses request's conversation as chat messages (`instructions` a system one);
    None when its text cannot stand for it: state the backend keeps, items other than
    messages, parts other than text."""
    for name in _BACKEND_STATE:
        raw = fields.get(name)
        if raw is not None and bytes(raw) != b"null":
            return None
    messages = [Message("system", view.instructions)] if view.instructions else []
    if isinstance(view.input, str):
        messages.append(Message("user", view.input))
        return messages
    for raw_item in view.input or ():
        try:
            item = _item_decoder.decode(raw_item)
        except JSON_ERRORS:  # not an object, or not a message's shape
            return None
        if item.type != "message" or not item.role:
            return None
        content = item.content
        if isinstance(content, list):
            texts = [p.text for p in content if p.type in _TEXT_PARTS and p.text is not None]
            if len(texts) != len(content):
                return None
            content = "\n".join(texts)
        messages.append(Message(item.role, content))
    return messages


class SemanticCaches:
    """An API's cache per product: the most specific lookup (the API's, else the product's,
    else the global one) with the most specific store."""

    __slots__ = ("_by_product", "_default", "all")

    def __init__(
        self, default: SemanticCache | None, by_product: Mapping[str, SemanticCache | None]
    ):
        self._default = default
        self._by_product = dict(by_product)
        self.all: Sequence[SemanticCache] = [
            c for c in {id(c): c for c in (default, *by_product.values()) if c}.values()
        ]

    def __bool__(self) -> bool:
        return bool(self.all)

    def for_product(self, product_id: str) -> SemanticCache | None:
        if product_id in self._by_product:
            return self._by_product[product_id]
        return self._default

    async def drain(self) -> None:
        for cache in self.all:
            await cache.drain()


Build = Callable[[CacheLookup, CacheStore | None], SemanticCache]


def semantic_caches(config: Config, api: Api, build: Build) -> SemanticCaches | None:
    """The compiled caches of `api`'s pipelines, or None when no pipeline has a lookup.
    `build` makes one from a lookup and a store (the composition root's embedders and
    indexes); pipelines with the same pair share it."""
    made: dict[tuple[int, int], SemanticCache] = {}
    api_lookup, api_store = _pick(api.policies)
    top_lookup, top_store = _pick(config.policies)

    def cache(lookup: CacheLookup | None, store: CacheStore | None) -> SemanticCache | None:
        if lookup is None:
            return None
        key = (id(lookup), id(store))
        if key not in made:
            made[key] = build(lookup, store)
        return made[key]

    default = cache(api_lookup or top_lookup, api_store or top_store)
    by_product = {}
    for product in config.products:
        lookup, store = _pick(product.policies)
        by_product[product.id] = cache(api_lookup or lookup or top_lookup,
                                       api_store or store or top_store)  # fmt: skip
    caches = SemanticCaches(default, by_product)
    return caches if caches else None


def _pick(policies: Sequence[PolicyEntry]) -> tuple[CacheLookup | None, CacheStore | None]:
    lookup = next((e.policy for e in policies if isinstance(e.policy, CacheLookup)), None)
    store = next((e.policy for e in policies if isinstance(e.policy, CacheStore)), None)
    return lookup, store
