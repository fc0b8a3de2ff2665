"""Microbenchmarks of the gateway's pure per-request code (pytest-benchmark).

Every benchmark also checks its result, so a broken code path fails instead of timing an
exception. Inputs are built once at import and shaped like real OpenAI traffic: a chat request
as the SDK sends it, a 64-token streamed reply with the usage chunk, an SDK's request headers.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from bench import stack
from proxy import config as config_module
from proxy.auth import ApiGuard, KeyRing
from proxy.dispatch import Backends
from proxy.exchange import Exchange
from proxy.relay import ChatStreamFilter
from proxy.routing import Router
from proxy.schemas import (
    ChatRequest,
    EmbeddingsRequest,
    Usage,
    decode_request,
    read_chunk,
    read_reply,
    with_stream_usage,
)
from proxy.sse import EventSplitter, parse_event

pytestmark = pytest.mark.bench

_encode = msgspec.json.encode

# --- inputs --------------------------------------------------------------------------------

MODEL = "gpt-4o-mini"
_SENTENCE = (
    "the gateway forwards each request to the backend and counts the tokens of every reply "
    "so that a team can see what it used and stay within the limits it was given"
)
_WORDS = _SENTENCE.split()

CHAT_SMALL = _encode(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
    }
)


def _paragraph(seed: int, words: int) -> str:
    return " ".join(_WORDS[(seed + i * 7) % len(_WORDS)] for i in range(words)).capitalize() + "."


TURNS = 23


def _large_chat() -> bytes:
    """A ~20 KB conversation: system prompt, 23 turns, a tool call and a multimodal message."""
    messages: list[dict[str, object]] = [{"role": "system", "content": _paragraph(0, 120)}]
    for turn in range(TURNS):
        messages.append({"role": "user", "content": _paragraph(turn, 60)})
        messages.append({"role": "assistant", "content": _paragraph(turn + 3, 90)})
    function = {"name": "lookup_order", "arguments": '{"order_id":"A-1042"}'}
    call = {"id": "call_abc123", "type": "function", "function": function}
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    messages.append({"role": "tool", "tool_call_id": "call_abc123", "content": '{"status":"ok"}'})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What does this chart show?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
            ],
        }
    )
    tool = {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look an order up by id.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
    body = {"model": MODEL, "messages": messages, "tools": [tool], "max_completion_tokens": 512}
    return _encode(body)


CHAT_LARGE = _large_chat()
CHAT_STREAM_REQUEST = _encode(
    {**msgspec.json.decode(CHAT_SMALL), "stream": True, "stream_options": {"include_usage": False}}
)
EMBEDDINGS = _encode(
    {
        "model": "text-embedding-3-small",
        "input": [_paragraph(i, 24) for i in range(8)],
        "dimensions": 512,
    }
)

PROMPT_TOKENS, COMPLETION_TOKENS, CACHED_TOKENS = 1180, 64, 1024
_USAGE = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
EXPECTED_USAGE = Usage(
    PROMPT_TOKENS, COMPLETION_TOKENS, PROMPT_TOKENS + COMPLETION_TOKENS, CACHED_TOKENS, 0
)
_PIECES = [_WORDS[0], *(" " + _WORDS[i % len(_WORDS)] for i in range(1, COMPLETION_TOKENS))]

CHAT_RESPONSE = _encode(
    {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(_PIECES), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }
)


def _chunk(choices: list[dict[str, object]], usage: dict[str, object] | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + _encode(chunk) + b"\n\n"


def _choice(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


DELTA_EVENT = _chunk([_choice({"content": " gateway"})])
USAGE_EVENT = _chunk([], _USAGE)
STREAM_EVENTS = [
    _chunk([_choice({"role": "assistant", "content": "", "refusal": None})]),
    *(_chunk([_choice({"content": piece})]) for piece in _PIECES),
    _chunk([_choice({}, "stop")]),
    USAGE_EVENT,
    b"data: [DONE]\n\n",
]
STREAM_BODY = b"".join(STREAM_EVENTS)  # ~18 KB: role, 64 deltas, finish, usage, [DONE]
STREAM_PIECES_7 = [STREAM_BODY[i : i + 7] for i in range(0, len(STREAM_BODY), 7)]

# --- decoding requests ---------------------------------------------------------------------


@pytest.mark.benchmark(group="decode")
def test_decode_chat_small(benchmark):
    assert 180 <= len(CHAT_SMALL) <= 220
    view = benchmark(decode_request, "chat-completions", CHAT_SMALL)
    assert isinstance(view, ChatRequest)
    assert (view.model, len(view.messages), view.max_tokens) == (MODEL, 2, 64)


@pytest.mark.benchmark(group="decode")
def test_decode_chat_20kb(benchmark):
    assert 19_000 <= len(CHAT_LARGE) <= 22_000
    view = benchmark(decode_request, "chat-completions", CHAT_LARGE)
    assert isinstance(view, ChatRequest)
    messages = 1 + 2 * TURNS + 3  # system, the turns, tool call, tool result, image question
    assert (view.model, len(view.messages), view.max_completion_tokens) == (MODEL, messages, 512)
    assert view.tools is not None and len(view.tools) == 1


@pytest.mark.benchmark(group="decode")
def test_decode_embeddings(benchmark):
    view = benchmark(decode_request, "embeddings", EMBEDDINGS)
    assert isinstance(view, EmbeddingsRequest)
    assert (view.model, len(view.input), view.dimensions) == ("text-embedding-3-small", 8, 512)


@pytest.mark.benchmark(group="decode")
def test_with_stream_usage(benchmark):
    body = benchmark(with_stream_usage, CHAT_STREAM_REQUEST)
    fields = msgspec.json.decode(body)
    assert fields["stream_options"] == {"include_usage": True}
    assert fields["stream"] is True and fields["messages"][1]["role"] == "user"


# --- reading usage -------------------------------------------------------------------------


@pytest.mark.benchmark(group="usage")
def test_usage_of_chat_completion(benchmark):
    assert benchmark(read_reply, CHAT_RESPONSE)[0] == EXPECTED_USAGE


@pytest.mark.benchmark(group="usage")
def test_read_chunk_delta(benchmark):
    assert benchmark(read_chunk, DELTA_EVENT[6:-2])[:2] == (None, False)


@pytest.mark.benchmark(group="usage")
def test_read_chunk_usage(benchmark):
    assert benchmark(read_chunk, USAGE_EVENT[6:-2])[:2] == (EXPECTED_USAGE, True)


# --- SSE -----------------------------------------------------------------------------------


def _split(pieces: list[bytes]) -> list[bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    for piece in pieces:
        events += splitter.feed(piece)
    assert splitter.flush() == b""
    return events


@pytest.mark.benchmark(group="sse")
def test_split_stream_whole(benchmark):
    assert benchmark(_split, [STREAM_BODY]) == STREAM_EVENTS


@pytest.mark.benchmark(group="sse")
def test_split_stream_7_byte_pieces(benchmark):
    assert len(STREAM_PIECES_7) > 2000
    assert benchmark(_split, STREAM_PIECES_7) == STREAM_EVENTS


@pytest.mark.benchmark(group="sse")
def test_parse_event(benchmark):
    name, data = benchmark(parse_event, DELTA_EVENT)
    assert name == b""
    assert data == DELTA_EVENT[6:-2]


def _filter_stream(strip_usage: bool) -> tuple[int, Usage | None, int]:
    stream_filter = ChatStreamFilter(strip_usage)
    kept = sum(1 for event in STREAM_EVENTS if stream_filter.keep(event))
    return kept, stream_filter.usage, stream_filter.dropped


@pytest.mark.benchmark(group="sse")
@pytest.mark.parametrize("strip_usage", [True, False], ids=["strip-usage", "keep-usage"])
def test_chat_stream_filter(benchmark, strip_usage):
    assert len(STREAM_EVENTS) == 68
    kept = len(STREAM_EVENTS) - 1 if strip_usage else len(STREAM_EVENTS)
    assert benchmark(_filter_stream, strip_usage) == (kept, EXPECTED_USAGE, 0)


# --- auth and routing ----------------------------------------------------------------------

SUBSCRIPTIONS = 100
_SUBSCRIPTION_LINES = "".join(
    f"  - {{id: team-{i:03}, scope: {'product:starter' if i % 2 else 'all-apis'}, "
    f"primary-key: team-{i:03}-primary-0123456789, secondary-key: team-{i:03}-second-0123456789}}\n"
    for i in range(SUBSCRIPTIONS)
)
CONFIG = config_module.loads(
    f"""
backends:
  - {{id: mock, url: "http://127.0.0.1:9000/v1"}}
apis:
  - {{id: chat, path: /openai, backend: mock, products: [starter]}}
  - {{id: raw, path: /passthrough, type: passthrough, backend: mock}}
products:
  - {{id: starter}}
subscriptions:
{_SUBSCRIPTION_LINES}""",
    env={},
)
KEY = b"team-057-primary-0123456789"
SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/openai/chat/completions",
    "query_string": b"",
    "headers": [
        (b"host", b"gateway.internal:8080"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"accept", b"application/json"),
        (b"content-type", b"application/json"),
        (b"user-agent", b"OpenAI/Python 1.82.0"),
        (b"x-stainless-lang", b"python"),
        (b"x-stainless-package-version", b"1.82.0"),
        (b"x-stainless-retry-count", b"0"),
        (b"api-key", KEY),
        (b"content-length", b"188"),
    ],
}


@pytest.mark.benchmark(group="auth")
def test_keyring_find(benchmark):
    ring = KeyRing(CONFIG.subscriptions)
    sub = benchmark(ring.find, KEY)
    assert sub is not None and sub.id == "team-057"


@pytest.mark.benchmark(group="auth")
def test_guard_identify_api_key_header(benchmark):
    guard = ApiGuard(CONFIG, CONFIG.api("chat"), KeyRing(CONFIG.subscriptions))
    identity = benchmark(guard.identify, SCOPE)
    assert identity.subscription is not None and identity.subscription.id == "team-057"
    assert identity.product is not None and identity.product.id == "starter"
    assert identity.consumed_headers == (b"api-key",)


def _router() -> Router[str]:
    router: Router[str] = Router()
    for path in ("/openai", "/team-b/openai", "/azure/openai/deployments/gpt-4o-mini"):
        router.add_openai(path, path)
    for path in ("/passthrough", "/raw/v2", "/raw/v2/files"):
        router.add_passthrough(path, path)
    return router


@pytest.mark.benchmark(group="routing")
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/openai/chat/completions", ("/openai", "chat-completions", "chat/completions")),
        ("/raw/v2/files/file-abc/content", ("/raw/v2/files", "passthrough", "file-abc/content")),
    ],
    ids=["openai", "passthrough"],
)
def test_router_match(benchmark, path, expected):
    match = benchmark(_router().match, "POST", path, path.encode())
    assert tuple(match) == expected


# --- dispatch: what Route.send adds over calling the upstream ------------------------------

_ROUTE_CONFIG = config_module.loads("""
backends:
  - {id: up, url: "http://127.0.0.1:9/v1"}
  - id: b1
    url: "http://127.0.0.1:9/v1"
    circuit-breaker:
      failure-condition: {count: 5, interval: 1m, status-code-ranges: [{min: 500, max: 599}]}
      trip-duration: 30s
  - {id: b2, url: "http://127.0.0.1:9/v1"}
  - {id: pool, type: pool, services: [{id: b1}, {id: b2}], retry: {count: 2}}
apis: [{id: c, path: /o, backend: up}]
""")


class _Reply:
    status = 200


def _stub_backends() -> Backends:
    """Backends whose upstreams answer at once, without a socket."""
    reply = _Reply()

    async def send(method, target, headers, body, length=None):
        return reply

    backends = Backends(_ROUTE_CONFIG)
    for route_id in ("up", "pool"):
        for member in backends.route(route_id).balancer.members:
            member.upstream.send = send  # type: ignore[method-assign]
    return backends


@pytest.mark.parametrize("how", ["upstream-direct", "route-single", "route-pool-breaker"])
def test_route_send(benchmark, how):
    backends = _stub_backends()
    exchange = Exchange("POST", "/o/chat/completions", "id", "127.0.0.1")
    headers = b"x-a: b\r\n" * 8
    body = b"x" * 300
    upstream = backends.route("up").balancer.members[0].upstream
    route = backends.route("pool" if how == "route-pool-breaker" else "up")
    loop = asyncio.new_event_loop()

    async def direct(n: int) -> None:
        for _ in range(n):
            target = upstream.target("chat/completions", "")
            await upstream.send("POST", target, headers + upstream.credential_line, body)

    async def routed(n: int) -> None:
        for _ in range(n):
            await route.send(exchange, "POST", "chat/completions", "", headers, body)

    batch = direct if how == "upstream-direct" else routed
    benchmark(lambda: loop.run_until_complete(batch(100)))  # per call: the time / 100
    loop.close()
    assert exchange.backend_id in ("", "up", "b1", "b2")


# --- the semantic cache ----------------------------------------------------------------------


@pytest.mark.parametrize(("entries", "dim"), [(1_000, 1_536), (10_000, 1_536), (10_000, 256)])
def test_memory_index_nearest(benchmark, entries, dim):
    """One lookup in a partition of `entries` unit vectors (README "Semantic cache")."""
    import numpy as np

    from proxy.cache.index import MemoryIndex

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((entries, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = MemoryIndex(max_entries=entries)
    for i, vector in enumerate(vectors):
        index.put("p", vector, b"%d" % i, 3600)
    loop = asyncio.new_event_loop()
    found = benchmark(lambda: loop.run_until_complete(index.nearest("p", vectors[17], 0.01)))
    loop.close()
    assert found is not None and found[0] == b"17" and found[1] < 1e-5


@pytest.mark.parametrize(("texts", "dim"), [(1, 1_536), (12, 1_536), (12, 256), (64, 256)])
def test_embeddings_reply_decode(benchmark, texts, dim):
    """An embeddings backend's reply of `texts` base64 vectors (one batch of lookups: ~12 at
    64 concurrent misses in bench.cache) read into unit vectors."""
    import base64

    import numpy as np

    from proxy.cache.embed import _vectors

    rng = np.random.default_rng(8)
    rows = rng.standard_normal((texts, dim)).astype(np.float32)
    data = [{"index": i, "embedding": base64.b64encode(row.tobytes()).decode()}
            for i, row in enumerate(rows)]  # fmt: skip
    payload = msgspec.json.encode({"object": "list", "data": data[::-1], "model": "m"})
    vectors = benchmark(_vectors, payload, texts)
    expected = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert np.allclose(np.stack(vectors), expected, atol=1e-6)


@pytest.mark.parametrize("size", ["short", "long"])
def test_local_embedder(benchmark, size):
    """The local embedder (extra [local-embeddings]) on one prompt, end to end: a question,
    or ~500 tokens of prose (the model reads the last 256)."""
    from proxy.cache.local import LocalEmbedder

    embedder = LocalEmbedder()
    loop = asyncio.new_event_loop()
    question = "What is the capital of France, and why is it the capital?"
    text = [question if size == "short" else " ".join([_SENTENCE] * 30)]
    (vector,) = benchmark(lambda: loop.run_until_complete(embedder.embed(text)))
    loop.run_until_complete(embedder.close())
    loop.close()
    assert vector.shape == (384,) and abs(float(vector @ vector) - 1.0) < 1e-4


# --- content safety: the local screen (README "Content safety") ------------------------------

# A blocklist as a user might keep one: 60 terms (phrases among them) and 3 patterns.
_TERMS, _PATTERNS = stack.SAFETY_TERMS, stack.SAFETY_PATTERNS
_PASTE = " ".join(_paragraph(i, 200) for i in range(40))[:30_000]
_NON_ASCII = ("Grüße aus Köln, ça va très bien — naïve café déjà vu. " * 600)[:30_000]
SCREENED = {
    "chat-small": CHAT_SMALL,
    "chat-20kb": CHAT_LARGE,
    "paste-30kb": _encode({"model": MODEL, "messages": [{"role": "user", "content": _PASTE}]}),
    "paste-30kb-non-ascii": _encode(
        {"model": MODEL, "messages": [{"role": "user", "content": _NON_ASCII}]}
    ),
}


def _local_policy(step: int = 100) -> object:
    from proxy.config import ContentSafety
    from proxy.safety.policy import SafetyMetrics, SafetyPolicy
    from proxy.safety.screen import LocalScreen

    spec = ContentSafety(blocklists=("banned",), enforce_on_completions=True,
                         stream_window_size=step)  # fmt: skip
    screen = LocalScreen({"banned": _TERMS}, {"banned": _PATTERNS})
    return SafetyPolicy(spec, screen, None, SafetyMetrics(None))


@pytest.mark.benchmark(group="safety")
@pytest.mark.parametrize("body", list(SCREENED))
def test_content_screen_request(benchmark, body):
    """A request through `check_request` with the local screen: flatten, normalise, match."""
    from proxy.safety.policy import check_request

    policies = [_local_policy()]
    raw = SCREENED[body]
    loop = asyncio.new_event_loop()
    ex = Exchange("POST", "/v1/chat/completions", "id", "127.0.0.1")
    benchmark(lambda: loop.run_until_complete(check_request(policies, raw, ex)))
    loop.close()  # no exception: nothing matched


@pytest.mark.benchmark(group="safety")
@pytest.mark.parametrize("step", [100, 1], ids=["every-100-chars", "every-event"])
def test_content_screen_stream(benchmark, step):
    """A 64-token streamed reply through `StreamGuard` (enforce-on-completions, local)."""
    from proxy.safety.stream import StreamGuard

    policies = [_local_policy(step)]
    loop = asyncio.new_event_loop()

    async def stream() -> int:
        guard = StreamGuard(policies, Exchange("POST", "/x", "id", "127.0.0.1"))
        sent = 0
        for event in STREAM_EVENTS:
            sent += len(await guard.admit([event]))
        return sent + len(await guard.end())

    sent = benchmark(lambda: loop.run_until_complete(stream()))
    loop.close()
    assert sent == len(STREAM_EVENTS)
