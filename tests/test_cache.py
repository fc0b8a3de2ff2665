"""The semantic cache in-process (the gateway's ASGI app) against the real mock backend, whose
embeddings are deterministic (similar prompts close, unrelated far), and its parts alone: the
in-process index, entries, what is embedded and how requests are partitioned (chat,
completions and the Responses API), config validation, /openapi.json.

Prompt distances under the mock's embeddings (proxy/mock_llm.py `embed`), threshold 0.15:
"What is the capital of France?" vs "What is the capital city of France?" 0.12 (hit),
vs "What is the capital of Spain?" 0.23 and "Write a poem about the sea and sailors" 0.81
(misses).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from proxy.app import Gateway, create_app
from proxy.cache import embed as embed_module
from proxy.cache import entry as entries
from proxy.cache import index as index_module
from proxy.cache.base import CacheBusyError, CacheUnavailableError, Vector
from proxy.cache.index import MemoryIndex
from proxy.cache.parts import IndexSlot
from proxy.cache.policy import SemanticCache
from proxy.config import ConfigError, loads
from proxy.exchange import Exchange
from proxy.mock_llm import embed
from proxy.schemas import (
    ChatRequest,
    CompletionRequest,
    ContentPart,
    Message,
    ResponsesRequest,
    decode_request,
)
from tests.conftest import KEY, KEY_B
from tests.mockproc import MockProc, free_port, start_mock
from tests.redisproc import RedisProc

FRANCE = "What is the capital of France?"
FRANCE_2 = "What is the capital city of France?"
SPAIN = "What is the capital of Spain?"
POEM = "Write a poem about the sea and sailors"
A = {"api-key": KEY}
B = {"api-key": KEY_B}
PATH = "/openai/chat/completions"


def config_text(
    mock_url: str,
    lookup: str = "",
    store: str = "duration: 1h",
    embeddings_url: str | None = None,
    api_policies: str = "",
) -> str:
    return f"""
backends:
  - id: mock
    url: {mock_url}
    timeout: {{connect: 2s, read: 5s}}
  - id: embeddings
    url: {embeddings_url or mock_url}
    timeout: {{connect: 2s, read: 5s}}
apis:
  - id: chat
    path: /openai
    backend: mock
    policies:
      - llm-semantic-cache-lookup: {{score-threshold: 0.15, embeddings-backend-id: embeddings{lookup}}}
      - llm-semantic-cache-store: {{{store}}}
{api_policies}
  - id: plain
    path: /plain
    backend: mock
subscriptions:
  - id: team-a
    primary-key: {KEY}
  - id: team-b
    primary-key: {KEY_B}
"""


def responses(text: str | list[Any], stream: bool = False, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "input": text, **more}
    if stream:
        body["stream"] = True
    return body


RESPONSES = "/openai/responses"


def chat(text: str, stream: bool = False, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        **more,
    }
    if stream:
        body["stream"] = True
    return body


Scenario = Callable[["Client"], Awaitable[None]]


class Client:
    """Calls the app directly with a recording `send`, so a stream's body messages (its
    chunking) are seen as the app sent them; waits for background stores."""

    def __init__(self, app: Gateway):
        self.app = app

    async def post(
        self,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        path: str = PATH,
        leave_after: int | None = None,
    ) -> Reply:
        """POST `body`; with `leave_after`, the client disconnects after that many body
        messages."""
        sent: list[dict[str, Any]] = []
        pending = [{"type": "http.request", "body": json.dumps(body).encode()}]
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if leave_after is not None and len(sent) > leave_after:
                gone.set()

        pairs = {"content-type": "application/json", **(headers if headers is not None else A)}
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in pairs.items()],
            "client": ("127.0.0.1", 5000), "server": ("gw", 80), "scheme": "http",
        }  # fmt: skip
        await self.app(scope, receive, send)
        await self.settle()
        return Reply(sent)

    async def settle(self) -> None:
        for caches in self.app.runtime.caches:
            await caches.drain()


class Reply:
    def __init__(self, sent: list[dict[str, Any]]):
        start = sent[0]
        self.status: int = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start["headers"]}
        self.bodies: list[bytes] = [m["body"] for m in sent[1:] if m.get("body")]
        self.body = b"".join(self.bodies)

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-cache")

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[bytes]:
        return [e + b"\n\n" for e in self.body.split(b"\n\n") if e]


def run(config: str, scenario: Scenario) -> Gateway:
    async def main() -> Gateway:
        app = create_app(loads(config))
        await app.startup(telemetry=False)  # keeps the registry: metrics count, nothing exported
        try:
            await scenario(Client(app))
        finally:
            await app.shutdown()
        return app

    return asyncio.run(main())


def backend_calls(mock: MockProc, path: str = "/v1/chat/completions") -> int:
    return sum(1 for r in mock.requests() if r["path"] == path)


@pytest.fixture
def backend(faulty: MockProc) -> MockProc:
    """The session's mock, no fault rules and no recorded requests (conftest `faulty`)."""
    return faulty


# --- end to end in-process: hits, misses, partitions -------------------------------------


def test_miss_then_hit_for_the_same_and_a_similar_prompt(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        first = await client.post(chat(FRANCE))
        assert (first.status, first.cache) == (200, "MISS")
        assert "x-cache-distance" not in first.headers
        same = await client.post(chat(FRANCE))
        assert (same.status, same.cache, same.headers["x-cache-distance"]) == (200, "HIT", "0.0000")
        assert same.body == first.body  # the stored reply, byte for byte (its id too)
        assert same.headers["content-type"] == "application/json"
        similar = await client.post(chat(FRANCE_2))
        assert similar.cache == "HIT" and similar.json()["id"] == first.json()["id"]
        assert 0.05 < float(similar.headers["x-cache-distance"]) <= 0.15
        for text in (SPAIN, POEM):
            other = await client.post(chat(text))
            assert other.cache == "MISS" and other.json()["id"] != first.json()["id"]

    run(config_text(backend.url), scenario)
    assert backend_calls(backend) == 3  # France, Spain, poem: the hits never reached it
    assert backend_calls(backend, "/v1/embeddings") == 5


TOPICS = [FRANCE, POEM, "How do ocean tides work?", "Recipe for sourdough bread",
          "Explain quantum entanglement simply", "Best exercises for lower back pain"]  # fmt: skip


def test_the_lookups_of_one_loop_turn_share_one_embeddings_request(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        first = await asyncio.gather(*(
            client.post(chat(topic), headers={**A, "x-mock-reply": f"answer {i}"})
            for i, topic in enumerate(TOPICS)
        ))  # fmt: skip
        assert [r.cache for r in first] == ["MISS"] * len(TOPICS)
        again = await asyncio.gather(*(client.post(chat(topic)) for topic in TOPICS))
        for i, reply in enumerate(again):  # each stored under its own prompt's vector
            assert reply.cache == "HIT" and reply.headers["x-cache-distance"] == "0.0000"
            assert reply.json()["choices"][0]["message"]["content"] == f"answer {i}"

    run(config_text(backend.url), scenario)
    asked = [json.loads(r["body"])["input"] for r in backend.requests()
             if r["path"] == "/v1/embeddings"]  # fmt: skip
    assert asked == [TOPICS, TOPICS]  # one request per turn, in the order they were asked


def test_a_lookup_given_up_leaves_its_batch_mates_their_answer(backend: MockProc) -> None:
    """Three lookups share one embeddings request to a backend taking 300 ms; the one given
    up after 50 ms (as its timeout would) does not cancel the request or the others' wait."""
    slow = start_mock()
    slow.faults({"faults": {"delay-ms": "300"}})

    async def scenario(client: Client) -> None:
        cache = client.app.runtime.caches[0].for_product("")
        assert isinstance(cache, SemanticCache)
        embed = cache.embedder.embed
        given_up = asyncio.ensure_future(asyncio.wait_for(embed([FRANCE]), 0.05))
        kept = asyncio.gather(embed([POEM]), embed([FRANCE, POEM]))
        with pytest.raises(TimeoutError):
            await given_up
        (poem,), (france, poem_again) = await kept
        assert float(france @ poem) < 0.9 and float(poem @ poem_again) == pytest.approx(1.0)

    try:
        run(config_text(backend.url, embeddings_url=slow.url), scenario)
        asked = [json.loads(r["body"])["input"] for r in slow.requests()
                 if r["path"] == "/v1/embeddings"]  # fmt: skip
        assert [sorted(texts) for texts in asked] == [sorted([FRANCE, POEM])]  # one request
    finally:
        slow.stop()


def test_a_prompt_asked_twice_in_one_turn_is_embedded_once(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        replies = await asyncio.gather(*(client.post(chat(t)) for t in [FRANCE, POEM, FRANCE]))
        assert [r.cache for r in replies] == ["MISS"] * 3

    run(config_text(backend.url), scenario)
    asked = [json.loads(r["body"])["input"] for r in backend.requests()
             if r["path"] == "/v1/embeddings"]  # fmt: skip
    assert asked == [[FRANCE, POEM]]


def test_streamed_hit_replays_the_stored_events_one_by_one(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        live = await client.post(chat(FRANCE, stream=True))
        assert live.cache == "MISS" and live.headers["content-type"] == "text/event-stream"
        hit = await client.post(chat(FRANCE, stream=True))
        assert hit.cache == "HIT" and hit.headers["content-type"] == "text/event-stream"
        assert hit.events() == live.events()  # the same events, the same ids and text
        assert hit.bodies == live.events()  # one body message per event
        assert hit.events()[-1] == b"data: [DONE]\n\n"
        assert not any(b'"usage"' in e for e in hit.events())  # not asked for: stripped
        # A client asking for usage gets the stored usage chunk back, where it was.
        usage = await client.post(chat(FRANCE, stream=True, stream_options={"include_usage": True}))
        assert usage.cache == "HIT"
        assert [e for e in usage.events() if b'"usage"' not in e] == live.events()
        chunk = json.loads(usage.events()[-2][6:])
        assert chunk["choices"] == [] and chunk["usage"]["completion_tokens"] == 16

    run(config_text(backend.url), scenario)
    assert backend_calls(backend) == 1


def test_whole_and_streamed_replies_are_cached_apart(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        assert (await client.post(chat(FRANCE, stream=True))).cache == "MISS"
        assert (await client.post(chat(FRANCE, stream=True))).cache == "HIT"
        assert (await client.post(chat(FRANCE))).cache == "HIT"

    run(config_text(backend.url), scenario)


def test_an_interrupted_stream_is_not_stored(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        broken = await client.post(chat(FRANCE, stream=True), {**A, "x-mock-close-after": "3"})
        assert broken.cache == "MISS" and b"BackendConnectionFailure" in broken.body
        again = await client.post(chat(FRANCE, stream=True))
        assert again.cache == "MISS" and again.events()[-1] == b"data: [DONE]\n\n"
        assert (await client.post(chat(FRANCE, stream=True))).cache == "HIT"

    run(config_text(backend.url), scenario)


@pytest.mark.parametrize("status", ["500", "429", "400"])
def test_a_reply_that_is_not_200_is_not_stored(backend: MockProc, status: str) -> None:
    async def scenario(client: Client) -> None:
        failed = await client.post(chat(FRANCE), {**A, "x-mock-status": status})
        assert (failed.status, failed.cache) == (int(status), "MISS")
        again = await client.post(chat(FRANCE))
        assert (again.status, again.cache) == (200, "MISS")

    run(config_text(backend.url), scenario)


def test_entries_expire_after_duration(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        assert (await client.post(chat(FRANCE))).cache == "HIT"
        await asyncio.sleep(1.1)
        assert (await client.post(chat(FRANCE))).cache == "MISS"

    run(config_text(backend.url, store="duration: 1s"), scenario)


def test_the_memory_index_keeps_max_entries_least_recently_used(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        for text in (FRANCE, POEM):
            assert (await client.post(chat(text))).cache == "MISS"
        assert (await client.post(chat(FRANCE))).cache == "HIT"  # now the most recent
        assert (await client.post(chat("How do airplanes fly?"))).cache == "MISS"  # evicts POEM
        assert (await client.post(chat(FRANCE))).cache == "HIT"
        assert (await client.post(chat(POEM))).cache == "MISS"

    run(config_text(backend.url, lookup=", max-entries: 2"), scenario)


def test_one_subscription_never_gets_another_ones_answer(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        mine = await client.post(chat(FRANCE), A)
        theirs = await client.post(chat(FRANCE), B)
        assert (mine.cache, theirs.cache) == ("MISS", "MISS")
        assert theirs.json()["id"] != mine.json()["id"]
        assert (await client.post(chat(FRANCE), A)).json()["id"] == mine.json()["id"]
        assert (await client.post(chat(FRANCE), B)).json()["id"] == theirs.json()["id"]

    run(config_text(backend.url), scenario)


def test_subscriptions_share_entries_only_when_configured(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        mine = await client.post(chat(FRANCE), A)
        theirs = await client.post(chat(FRANCE), B)
        assert (mine.cache, theirs.cache) == ("MISS", "HIT")
        assert theirs.body == mine.body

    run(config_text(backend.url, lookup=", share-across-subscriptions: true"), scenario)


def test_vary_by_partitions_further(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        red = {**A, "x-team": "red"}
        assert (await client.post(chat(FRANCE), red)).cache == "MISS"
        assert (await client.post(chat(FRANCE), {**A, "x-team": "blue"})).cache == "MISS"
        assert (await client.post(chat(FRANCE), A)).cache == "MISS"  # no header: its own
        assert (await client.post(chat(FRANCE), red)).cache == "HIT"
        # vary-by adds to the subscription, it does not replace it
        assert (await client.post(chat(FRANCE), {**B, "x-team": "red"})).cache == "MISS"

    run(config_text(backend.url, lookup=', vary-by: ["{request.header.X-Team}"]'), scenario)


@pytest.mark.parametrize(
    "other",
    [
        {"temperature": 0.2},
        {"max_tokens": 5},
        {"response_format": {"type": "json_object"}},
        {"model": "gpt-4o"},
    ],
)
def test_other_request_parameters_must_match(backend: MockProc, other: dict[str, Any]) -> None:
    async def scenario(client: Client) -> None:
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        assert (await client.post(chat(FRANCE, **other))).cache == "MISS"
        assert (await client.post(chat(FRANCE, **other))).cache == "HIT"
        # `user` and `stream_options` do not change the answer
        assert (await client.post(chat(FRANCE, user="someone"))).cache == "HIT"

    run(config_text(backend.url), scenario)


def test_more_messages_than_max_message_count_skip_the_cache(backend: MockProc) -> None:
    long = chat(FRANCE)
    long["messages"] = [
        {"role": "system", "content": "Be brief."},  # left out of the count
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": FRANCE},
    ]
    short = {**long, "messages": long["messages"][:3]}

    async def scenario(client: Client) -> None:
        for _ in range(2):
            skipped = await client.post(long)
            assert (skipped.status, skipped.cache) == (200, "SKIP")
        assert (await client.post(short)).cache == "MISS"
        assert (await client.post(short)).cache == "HIT"

    run(config_text(backend.url, lookup=", max-message-count: 2"), scenario)
    assert backend_calls(backend) == 3
    assert backend_calls(backend, "/v1/embeddings") == 2  # never for the skipped ones


@pytest.mark.parametrize("ignore", [True, False])
def test_ignore_system_messages(backend: MockProc, ignore: bool) -> None:
    def asked(system: str) -> dict[str, Any]:
        body = chat(FRANCE)
        body["messages"].insert(0, {"role": "system", "content": system})
        return body

    async def scenario(client: Client) -> None:
        assert (await client.post(asked("You are a helpful assistant."))).cache == "MISS"
        other = await client.post(asked("Answer like a pirate, always, in every reply."))
        assert other.cache == ("HIT" if ignore else "MISS")

    lookup = f", ignore-system-messages: {str(ignore).lower()}"
    run(config_text(backend.url, lookup=lookup), scenario)


def test_a_hit_is_not_charged_to_the_token_limit(backend: MockProc) -> None:
    limit = """      - llm-token-limit:
          tokens-per-minute: 10000
          remaining-tokens-header-name: x-remaining
          tokens-consumed-header-name: x-consumed"""

    async def scenario(client: Client) -> None:
        first = await client.post(chat(FRANCE))
        spent = first.json()["usage"]["total_tokens"]
        assert int(first.headers["x-remaining"]) == 10000 - spent
        hit = await client.post(chat(FRANCE))
        assert hit.cache == "HIT"
        assert "x-remaining" not in hit.headers and "x-consumed" not in hit.headers
        other = await client.post(chat(POEM))
        assert other.cache == "MISS"
        more = other.json()["usage"]["total_tokens"]
        assert int(other.headers["x-remaining"]) == 10000 - spent - more  # nothing for the hit
        assert int(other.headers["x-consumed"]) == more
        limiter = client.app.limiter
        assert limiter is not None

    run(config_text(backend.url, api_policies=limit), scenario)


# --- failing cache parts: fail open, bounded, counted, logged once ------------------------


def _errors(app: Gateway) -> dict[tuple[object, ...], float]:
    instrument = app.cache_parts.metrics.errors
    assert instrument is not None
    return dict(instrument.series)


def _lookups(app: Gateway) -> dict[tuple[object, ...], float]:
    instrument = app.cache_parts.metrics.lookups
    assert instrument is not None
    return dict(instrument.series)


def test_embeddings_backend_down_is_a_miss_logged_once_and_counted(
    backend: MockProc, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"

    async def scenario(client: Client) -> None:
        for text in (FRANCE, FRANCE, POEM):
            reply = await client.post(chat(text))
            assert (reply.status, reply.cache) == (200, "MISS")
            assert reply.json()["usage"]["completion_tokens"] == 16

    with caplog.at_level(logging.WARNING, logger="tollway"):
        app = run(config_text(backend.url, embeddings_url=dead), scenario)
    assert _errors(app) == {("lookup", "unavailable"): 3}
    assert _lookups(app) == {("chat", "error"): 3}
    lines = [r.getMessage() for r in caplog.records if "semantic cache" in r.getMessage()]
    assert len(lines) == 1 and "lookup unavailable" in lines[0]
    assert backend_calls(backend) == 3


@contextlib.contextmanager
def embeddings_server(answer: Callable[[bytes], tuple[int, bytes]]) -> Iterator[str]:
    """A real HTTP server on loopback that answers each POST's body with `answer(body)`
    (status, JSON): an embeddings backend misbehaving as a test needs. Yields its /v1 URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status, reply = answer(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


_MALFORMED_EMBEDDINGS = {
    "bad base64 padding": {"data": [{"embedding": "abc", "index": 0}]},
    "base64 of 5 bytes": {"data": [{"embedding": "AAAAAAA=", "index": 0}]},
    "not base64 at all": {"data": [{"embedding": "***", "index": 0}]},
    "strings in the list": {"data": [{"embedding": ["a", "b"], "index": 0}]},
    "nan": {"data": [{"embedding": "AADAfw==", "index": 0}]},  # one float32 NaN
    "zero vector": {"data": [{"embedding": [0.0, 0.0], "index": 0}]},
    "empty": {"data": [{"embedding": "", "index": 0}]},
    "two vectors for one text": {"data": [{"embedding": [1.0]}, {"embedding": [1.0]}]},
    "no data": {"object": "list"},
}


@pytest.mark.parametrize("reply", list(_MALFORMED_EMBEDDINGS))
def test_a_malformed_embeddings_reply_is_a_miss_counted_as_an_error(
    backend: MockProc, reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a 200 from the embeddings backend holds, the request goes on as a miss."""
    payload = json.dumps(_MALFORMED_EMBEDDINGS[reply]).encode()

    async def scenario(client: Client) -> None:
        for text in (FRANCE, POEM):
            answer = await client.post(chat(text))
            assert (answer.status, answer.cache) == (200, "MISS")
            assert answer.json()["usage"]["completion_tokens"] == 16

    with (
        embeddings_server(lambda _: (200, payload)) as url,
        caplog.at_level(logging.WARNING, logger="tollway"),
    ):
        app = run(config_text(backend.url, embeddings_url=url), scenario)
    assert _errors(app) == {("lookup", "unavailable"): 2}
    lines = [r.getMessage() for r in caplog.records if "semantic cache" in r.getMessage()]
    assert len(lines) == 1 and "embeddings backend" in lines[0]


def test_a_batch_reply_is_read_in_order_as_unit_vectors_or_not_at_all() -> None:
    """A reply for several texts (one batch of lookups): its vectors come back in the texts'
    order, each of unit length, from base64 or from lists; one bad vector fails the whole
    batch (its lookups go on as misses)."""
    rng = np.random.default_rng(25)
    rows = rng.standard_normal((3, 96)).astype(np.float32)
    as_base64 = [base64.b64encode(row.tobytes()).decode() for row in rows]
    as_lists = [row.tolist() for row in rows]
    for embeddings in (as_base64, as_lists):
        data = [{"embedding": embeddings[i], "index": i} for i in (2, 0, 1)]
        vectors = embed_module._vectors(json.dumps({"data": data}).encode(), 3)
        for vector, row in zip(vectors, rows, strict=True):
            assert vector.dtype == np.float32 and vector.shape == (96,)
            assert np.allclose(vector, row / np.linalg.norm(row), atol=1e-6)
    nan = base64.b64encode(np.full(96, np.nan, dtype=np.float32).tobytes()).decode()
    for bad in ([as_base64[0], nan, as_base64[2]], [as_lists[0], [0.0] * 96, as_lists[2]],
                [as_base64[0], as_base64[1][:-4], as_base64[2]]):  # fmt: skip
        payload = json.dumps({"data": [{"embedding": e, "index": i} for i, e in enumerate(bad)]})
        with pytest.raises(CacheUnavailableError):
            embed_module._vectors(payload.encode(), 3)


def test_a_hung_embeddings_backend_costs_at_most_the_timeout(backend: MockProc) -> None:
    with socket.socket() as hung:  # accepts connections (backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1"

        async def scenario(client: Client) -> None:
            for _ in range(2):
                t = time.perf_counter()
                reply = await client.post(chat(FRANCE))
                took = time.perf_counter() - t
                assert (reply.status, reply.cache) == (200, "MISS")
                assert 0.2 <= took < 1.0  # the 200 ms bound plus the backend's reply

        app = run(config_text(backend.url, lookup=", timeout: 200ms", embeddings_url=url), scenario)
    assert _errors(app) == {("lookup", "timeout"): 2}


class BrokenIndex:
    async def nearest(self, partition: str, vector: Vector, max_distance: float) -> None:
        raise CacheUnavailableError("index down")

    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        raise CacheUnavailableError("index down")

    async def close(self) -> None:
        pass


class WriteOnlyIndex(MemoryIndex):
    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        raise CacheUnavailableError("read-only replica")


def test_a_failing_index_never_fails_the_request(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        slot = client.app.runtime.caches[0].all[0].index
        assert isinstance(slot, IndexSlot)
        slot.current = BrokenIndex()
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        slot.current = WriteOnlyIndex()
        assert (await client.post(chat(FRANCE))).cache == "MISS"  # its store fails, counted
        assert (await client.post(chat(FRANCE, stream=True))).cache == "MISS"

    app = run(config_text(backend.url), scenario)
    assert _errors(app) == {("lookup", "unavailable"): 1, ("store", "unavailable"): 2}


class BusyIndex(MemoryIndex):
    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        raise CacheBusyError("16 stores unanswered")


def test_a_store_dropped_by_a_busy_index_is_counted_not_an_outage(
    backend: MockProc, caplog: pytest.LogCaptureFixture
) -> None:
    """An index too far behind drops the store (it logs that itself): the cache counts it
    and does not say the index is down, nor that it answers again at the next store."""

    async def scenario(client: Client) -> None:
        slot = client.app.runtime.caches[0].all[0].index
        assert isinstance(slot, IndexSlot)
        slot.current = BusyIndex(100)
        for text in (FRANCE, POEM):
            assert (await client.post(chat(text))).cache == "MISS"
        slot.current = MemoryIndex(100)
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        assert (await client.post(chat(FRANCE))).cache == "HIT"

    with caplog.at_level(logging.WARNING, logger="tollway"):
        app = run(config_text(backend.url), scenario)
    assert _errors(app) == {("store", "busy"): 2}
    assert not [r for r in caplog.records if "semantic cache" in r.getMessage()]


def test_lookups_are_counted_by_result_and_hits_are_span_events(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        await client.post(chat(FRANCE))
        await client.post(chat(FRANCE))
        await client.post({"model": "m", "messages": [{"role": "system", "content": "x"}]})
        cache = client.app.runtime.caches[0].for_product("")
        assert isinstance(cache, SemanticCache)
        exchange = Exchange("POST", PATH, "r1", "127.0.0.1")
        exchange.trace = (1, 2, 0, 1)
        exchange.api_id, exchange.operation, exchange.subscription_id = (
            "chat", "chat-completions", "team-a",
        )  # fmt: skip
        view = ChatRequest(model="gpt-4o-mini", messages=[Message("user", FRANCE)])
        body = json.dumps(chat(FRANCE)).encode()
        found = await cache.lookup(view, body, exchange, {"headers": []}, "")
        assert found.result == "hit"
        assert exchange.events is not None
        ((name, _, attributes),) = exchange.events
        assert name == "tollway.cache.hit" and attributes == (("tollway.cache.distance", 0.0),)

    app = run(config_text(backend.url), scenario)
    assert _lookups(app) == {("chat", "miss"): 1, ("chat", "hit"): 2, ("chat", "skip"): 1}


def test_apis_without_a_lookup_have_no_cache_work(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        plain = await client.post(chat(FRANCE), path="/plain/chat/completions")
        assert plain.status == 200 and "x-cache" not in plain.headers
        handler = client.app.runtime.router.match("POST", "/plain/chat/completions", b"").target
        assert getattr(handler, "caches", "?") is None

    run(config_text(backend.url), scenario)
    assert backend_calls(backend, "/v1/embeddings") == 0


def test_completions_are_cached_too(backend: MockProc) -> None:
    body = {"model": "gpt-4o-mini", "prompt": FRANCE}

    async def scenario(client: Client) -> None:
        path = "/openai/completions"
        first = await client.post(body, path=path)
        hit = await client.post(body, path=path)
        assert (first.cache, hit.cache, hit.body) == ("MISS", "HIT", first.body)
        assert (await client.post(chat(FRANCE))).cache == "MISS"  # another operation

    run(config_text(backend.url), scenario)


def test_responses_miss_then_hit_for_the_same_and_a_similar_input(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        first = await client.post(responses(FRANCE), path=RESPONSES)
        assert (first.status, first.cache) == (200, "MISS")
        assert first.json()["status"] == "completed"
        same = await client.post(responses(FRANCE), path=RESPONSES)
        assert (same.cache, same.headers["x-cache-distance"], same.body) == ("HIT", "0.0000",
                                                                              first.body)  # fmt: skip
        assert same.headers["content-type"] == "application/json"
        similar = await client.post(responses(FRANCE_2), path=RESPONSES)
        assert similar.cache == "HIT" and similar.json()["id"] == first.json()["id"]
        as_items = responses(
            [{"role": "user", "content": [{"type": "input_text", "text": FRANCE}]}]
        )
        assert (await client.post(as_items, path=RESPONSES)).body == first.body
        other = await client.post(responses(FRANCE, instructions="Answer like a pirate."),
                                  path=RESPONSES)  # fmt: skip
        assert other.cache == "MISS"  # other instructions: another partition
        assert (await client.post(chat(FRANCE))).cache == "MISS"  # another operation
        assert (await client.post(responses(SPAIN), path=RESPONSES)).cache == "MISS"

    run(config_text(backend.url), scenario)
    assert backend_calls(backend, "/v1/responses") == 3  # France, pirate France, Spain


def test_a_streamed_responses_hit_replays_the_stored_events(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        live = await client.post(responses(FRANCE, stream=True), path=RESPONSES)
        assert live.cache == "MISS" and live.headers["content-type"] == "text/event-stream"
        assert live.events()[-1].startswith(b"event: response.completed\n")
        hit = await client.post(responses(FRANCE, stream=True), path=RESPONSES)
        assert hit.cache == "HIT" and hit.headers["content-type"] == "text/event-stream"
        assert hit.events() == live.events() and hit.bodies == live.events()
        assert sum(b"response.output_text.delta" in e for e in hit.events()) == 16
        whole = await client.post(responses(FRANCE), path=RESPONSES)
        assert whole.cache == "MISS"  # a stream answers only streaming requests
        assert (await client.post(responses(FRANCE, stream=True), path=RESPONSES)).cache == "HIT"

    run(config_text(backend.url), scenario)
    assert backend_calls(backend, "/v1/responses") == 2


@pytest.mark.parametrize("stream", [False, True])
def test_an_incomplete_responses_reply_is_not_stored(backend: MockProc, stream: bool) -> None:
    capped = responses(FRANCE, stream=stream, max_output_tokens=5)

    async def scenario(client: Client) -> None:
        for _ in range(2):
            reply = await client.post(capped, path=RESPONSES)
            assert (reply.status, reply.cache) == (200, "MISS")
            assert b'"status":"incomplete"' in reply.body
        assert (await client.post(responses(FRANCE, stream=stream), path=RESPONSES)).cache == "MISS"
        assert (await client.post(responses(FRANCE, stream=stream), path=RESPONSES)).cache == "HIT"

    run(config_text(backend.url), scenario)


def test_a_cut_responses_stream_is_not_stored(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        body = responses(FRANCE, stream=True)
        broken = await client.post(body, {**A, "x-mock-close-after": "6"}, path=RESPONSES)
        assert broken.cache == "MISS" and b"BackendConnectionFailure" in broken.body
        assert b"response.completed" not in broken.body
        assert (await client.post(body, path=RESPONSES)).cache == "MISS"
        assert (await client.post(body, path=RESPONSES)).cache == "HIT"

    run(config_text(backend.url), scenario)


@pytest.mark.parametrize(
    "more",
    [
        {"previous_response_id": "resp_123"},
        {"conversation": "conv_123"},
        {"input": [{"role": "user", "content": FRANCE},
                   {"type": "function_call_output", "call_id": "c1", "output": "Paris"}]},
    ],
)  # fmt: skip
def test_responses_the_cache_cannot_stand_for_skip_it(
    backend: MockProc, more: dict[str, Any]
) -> None:
    async def scenario(client: Client) -> None:
        assert (await client.post(responses(FRANCE), path=RESPONSES)).cache == "MISS"
        for _ in range(2):
            skipped = await client.post(responses(FRANCE, **more), path=RESPONSES)
            assert (skipped.status, skipped.cache) == (200, "SKIP")

    run(config_text(backend.url), scenario)
    assert backend_calls(backend, "/v1/embeddings") == 1  # never for the skipped ones


def test_a_responses_hit_is_screened_by_content_safety(backend: MockProc, tmp_path: Any) -> None:
    path = tmp_path / "tollway.yaml"
    path.write_text(config_text(backend.url))
    screened = (
        config_text(
            backend.url,
            api_policies="      - llm-content-safety: {blocklists: [banned], enforce-on-completions: true}",
        )
        + "blocklists:\n  banned: {terms: [secret plan]}\n"
    )
    told = {**A, "x-mock-reply": "here is the secret plan for you"}

    async def main() -> None:
        app = create_app(loads(path.read_text()), config_path=str(path))
        await app.startup(telemetry=False)
        client = Client(app)
        try:
            for stream in (False, True):
                body = responses(FRANCE, stream=stream)
                assert (await client.post(body, told, path=RESPONSES)).cache == "MISS"
                assert (await client.post(body, path=RESPONSES)).cache == "HIT"
            path.write_text(screened)
            assert await app.reload()
            for stream in (False, True):
                body = responses(FRANCE, stream=stream)
                blocked = await client.post(body, path=RESPONSES)
                assert blocked.status == 403 and b"ContentBlocked" in blocked.body
        finally:
            await app.shutdown()

    asyncio.run(main())


# --- the parts alone -----------------------------------------------------------------------


def unit(text: str, dim: int = 64) -> Vector:
    return np.asarray(embed(text, dim), dtype=np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_index_nearest_within_the_threshold_per_partition() -> None:
    async def main() -> None:
        index = MemoryIndex(10)
        await index.add("p", unit(FRANCE), b"france", 60)
        await index.add("p", unit(POEM), b"poem", 60)
        found = await index.nearest("p", unit(FRANCE_2), 0.2)
        assert found is not None and found[0] == b"france"
        assert found[1] == pytest.approx(1 - float(unit(FRANCE) @ unit(FRANCE_2)), abs=1e-5)
        assert await index.nearest("p", unit(SPAIN), 0.01) is None
        assert await index.nearest("q", unit(FRANCE), 2.0) is None  # another partition
        await index.add("p", unit(FRANCE), b"france again", 60)  # the same vector: replaced
        assert len(index) == 2
        assert await index.nearest("p", unit(FRANCE), 0.0) == (b"france again", 0.0)

    asyncio.run(main())


def test_memory_index_expires_and_evicts() -> None:
    async def main() -> None:
        clock = Clock()
        index = MemoryIndex(3, clock)
        texts = [FRANCE, POEM, SPAIN, "How do airplanes fly?"]
        for i, text in enumerate(texts[:3]):
            await index.add(f"p{i % 2}", unit(text), text.encode(), 10 + i)
        assert await index.nearest("p0", unit(FRANCE), 0.01) is not None  # FRANCE most recent
        await index.add("p1", unit(texts[3]), b"planes", 100)  # full: evicts POEM (oldest)
        assert len(index) == 3 and index.evicted == 1
        assert await index.nearest("p1", unit(POEM), 0.01) is None
        assert await index.nearest("p0", unit(FRANCE), 0.01) is not None
        clock.now += 10.5  # FRANCE (ttl 10) expired, SPAIN (12) not yet
        assert await index.nearest("p0", unit(FRANCE), 0.01) is None
        assert await index.nearest("p0", unit(SPAIN), 0.01) is not None
        assert len(index) == 2
        clock.now += 2
        assert await index.nearest("p0", unit(SPAIN), 2.0) is None
        assert await index.nearest("p1", unit(texts[3]), 0.01) is not None

    asyncio.run(main())


def test_memory_index_stays_consistent_under_churn() -> None:
    async def main() -> None:
        clock = Clock()
        rng = np.random.default_rng(7)
        index = MemoryIndex(50, clock)
        live: dict[bytes, tuple[str, Vector, float]] = {}
        for i in range(2000):
            vector = rng.standard_normal(16).astype(np.float32)
            vector /= np.linalg.norm(vector)
            part = f"p{i % 5}"
            ttl = float(rng.integers(1, 30))
            await index.add(part, vector, b"%d" % i, ttl)
            live[b"%d" % i] = (part, vector, clock.now + ttl)
            clock.now += 0.5
            if i % 7 == 0:
                payload = rng.choice(list(live))
                part, vector, expires = live[payload]
                found = await index.nearest(part, vector, 1e-4)
                if found is not None:
                    assert found[0] == payload and expires > clock.now
            assert len(index) <= 50

    asyncio.run(main())


def test_memory_index_knows_each_partitions_earliest_expiry() -> None:
    """A lookup reads the partition's earliest expiry from a float kept up to date (or
    recomputed after a removal or a renewal): never an expired entry returned, never a
    stale value, through adds, renewals (shorter and longer), discards, evictions and
    expiry."""

    async def main() -> None:
        clock = Clock()
        rng = np.random.default_rng(21)
        index = MemoryIndex(40, clock)
        vectors = [rng.standard_normal(8).astype(np.float32) for _ in range(60)]
        vectors = [v / np.linalg.norm(v) for v in vectors]
        expiry: dict[int, float] = {}  # vector -> its entry's expiry, as last stored
        for _ in range(3000):
            i = int(rng.integers(len(vectors)))
            part = f"p{i % 3}"
            action = rng.random()
            if action < 0.5:
                ttl = float(rng.integers(1, 40))
                index.put(part, vectors[i], b"%d" % i, ttl)  # a renewal if it is there
                expiry[i] = clock.now + ttl
            elif action < 0.55:
                index.discard(part, b"%d" % i)
            else:
                found = await index.nearest(part, vectors[i], 1e-4)
                if found is not None:
                    assert found[0] == b"%d" % i and expiry[i] > clock.now
            for name, partition in index._partitions.items():
                rows = partition.expires[: partition.size]
                assert partition.soonest is None or partition.soonest == rows.min(), name
            clock.now += float(rng.random())

    asyncio.run(main())


def test_one_lookup_drops_every_expired_row_and_keeps_the_rest() -> None:
    """A lookup that meets expired rows drops them all at once (found in one pass, removed
    from the last): what is left is exactly the live entries, each found as itself, with the
    LRU order still pointing at their rows."""

    async def main() -> None:
        clock = Clock()
        rng = np.random.default_rng(22)
        index = MemoryIndex(1_000, clock)
        vectors = _embedding_like(rng, 600, 64)
        ttls = rng.integers(1, 100, len(vectors)).astype(float)
        for i, (vector, ttl) in enumerate(zip(vectors, ttls, strict=True)):
            index.put("p", vector, b"%d" % i, float(ttl))
        start = clock.now
        clock.now += 50.5
        assert await index.nearest("p", vectors[int(ttls.argmax())], 1e-4) is not None
        live = {b"%d" % i for i in np.flatnonzero(ttls > 50.5)}
        part = index._partitions["p"]
        assert 200 < part.size == len(live) == len(index) < 400
        assert set(part.payloads) == live and bool((part.expires[: part.size] > clock.now).all())
        for entry_id, (name, row) in index._lru.items():
            assert name == "p" and part.ids[row] == entry_id
        for i in rng.choice(len(vectors), 200, replace=False):
            found = await index.nearest("p", vectors[i], 1e-4)
            assert (found is not None and found[0] == b"%d" % i) == (start + ttls[i] > clock.now)

    asyncio.run(main())


def test_rows_added_at_once_are_found_and_bounded() -> None:
    """`put_many` (a partition read whole): every row found as itself beside the rows held
    before (which keep their own expiry), the bound evicting the least recently used first
    and keeping the last rows of a batch larger than the index."""

    async def main() -> None:
        clock = Clock()
        rng = np.random.default_rng(23)
        stored = _embedding_like(rng, 150, 64)
        payloads = [b"%d" % i for i in range(150)]
        index = MemoryIndex(100, clock)
        index.put("p", stored[0], payloads[0], 5)
        index.put_many("p", stored[1:10], payloads[1:10], np.full(9, 30.0))
        assert index.count("p") == len(index) == 10
        for i in range(10):
            found = await index.nearest("p", stored[i], 1e-4)
            assert found is not None and found[0] == payloads[i]
        clock.now += 6  # the row held before: its own expiry
        assert await index.nearest("p", stored[0], 1e-4) is None
        assert index.count("p") == 9
        index.put("q", stored[149], b"q", 60)
        index.put_many("p", stored[:120], payloads[:120], np.full(120, 20.0))
        assert index.count("p") == len(index) == 100 and index.count("q") == 0
        assert index.evicted == 10  # p's nine older rows and q's, least recently used
        part = index._partitions["p"]
        assert sorted(part.payloads) == sorted(payloads[20:120])
        for entry_id, (name, row) in index._lru.items():
            assert name == "p" and part.ids[row] == entry_id
        for i in rng.choice(np.arange(20, 120), 30, replace=False):
            found = await index.nearest("p", stored[i], 1e-4)
            assert found is not None and found[0] == payloads[i]
        clock.now += 20.5
        assert await index.nearest("p", stored[50], 1e-4) is None and len(index) == 0
        index.put_many("p", stored[:3], payloads[:3], np.full(3, 5.0))
        other = _embedding_like(rng, 2, 32)
        index.put_many("p", other, [b"x", b"y"], np.full(2, 5.0))  # another dimension
        assert index.count("p") == 2 and await index.nearest("p", other[1], 1e-4) is not None

    asyncio.run(main())


def test_the_memory_index_counts_the_bytes_its_entries_take() -> None:
    """`held_bytes` (the `tollway.cache.bytes` gauge) stays equal to the payloads and rows
    held, through adds, renewals with longer or shorter replies, adds at once, discards,
    expiry, evictions, a partition dropped and a clear; two dimensions, with and without a
    sketch."""

    def recounted(index: MemoryIndex) -> int:
        total = 0
        for part in index._partitions.values():
            sketch = index_module.SKETCH_DIM if part.sketch is not None else 0
            width = part.vectors.shape[1] + sketch
            total += sum(map(len, part.payloads)) + part.size * (4 * width + 8)
        return total

    async def main() -> None:
        clock = Clock()
        rng = np.random.default_rng(24)
        index = MemoryIndex(30, clock)
        pool = {8: _embedding_like(rng, 40, 8), 256: _embedding_like(rng, 40, 256)}
        sketched = False
        for step in range(2_000):
            dim = 8 if step % 3 else 256
            i = int(rng.integers(40))
            part = f"{dim}-{i % 3}"
            payload = b"x" * int(rng.integers(1, 500))
            action = rng.random()
            if action < 0.5:
                index.put(part, pool[dim][i], payload, float(rng.integers(1, 30)))
            elif action < 0.55:
                rows = rng.choice(40, 5, replace=False)
                payloads = [b"y%d" % r * int(rng.integers(1, 50)) for r in rows]
                index.put_many(part, pool[dim][rows], payloads, np.full(5, 10.0))
            elif action < 0.6:
                held = index._partitions.get(part)
                if held is not None and held.payloads:
                    index.discard(part, held.payloads[0])
            elif action < 0.61:
                index.drop(part)
            else:
                await index.nearest(part, pool[dim][i], 1e-4)
            assert index.held_bytes() == recounted(index)
            sketched |= any(p.sketch is not None for p in index._partitions.values())
            clock.now += float(rng.random())
        assert index.evicted > 0 and index.held_bytes() > 0 and sketched
        index.clear()
        assert index.held_bytes() == 0

    asyncio.run(main())


def _embedding_like(rng: np.random.Generator, rows: int, dim: int) -> Vector:
    """Unit vectors bunched around one direction, as real embeddings are (unrelated texts
    at cosine ~0.3 rather than 0): the hard case for a sketch."""
    common = rng.standard_normal(dim).astype(np.float32)
    common /= np.linalg.norm(common)
    out = rng.standard_normal((rows, dim)).astype(np.float32) / np.float32(np.sqrt(dim))
    out += np.float32(0.65) * common
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


@pytest.mark.parametrize(("rows", "dim"), [(12_000, 384), (1_100, 256)])
def test_a_large_partition_finds_near_duplicates_through_its_sketch(rows: int, dim: int) -> None:
    """Past SKETCH_FROM a lookup scores the rows' sketches, then the best candidates exactly:
    every near duplicate is still found, with its exact distance; nothing unrelated is (a
    large partition, and one just past SKETCH_FROM)."""
    rng = np.random.default_rng(11)
    assert rows * dim >= index_module.SKETCH_FROM
    stored = _embedding_like(rng, rows, dim)

    async def main() -> None:
        index = MemoryIndex(rows)
        for i, vector in enumerate(stored):
            index.put("p", vector, b"%d" % i, 3600)
        for i in rng.choice(rows, 300, replace=False):
            query = stored[i] + rng.standard_normal(dim).astype(np.float32) * np.float32(0.006)
            query /= np.linalg.norm(query)
            exact = stored @ query
            assert int(exact.argmax()) == i  # the test's premise: i is the nearest
            found = await index.nearest("p", query, 0.05)
            assert found is not None and found[0] == b"%d" % i
            assert found[1] == pytest.approx(1.0 - float(exact[i]), abs=1e-5)
        for query in _embedding_like(rng, 50, dim):  # new texts: farther than 0.05 from all
            assert float((stored @ query).max()) < 0.95
            assert await index.nearest("p", query, 0.05) is None

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["random", "ties", "sorted", "few"])
def test_the_sketch_candidates_always_hold_the_best_rows(kind: str) -> None:
    rng = np.random.default_rng(13)
    for _ in range(200):
        n = int(rng.integers(33, 20_000)) if kind != "few" else int(rng.integers(33, 120))
        scores = rng.standard_normal(n).astype(np.float32)
        if kind == "ties":
            scores = np.round(scores, 0)  # a handful of values: cut-offs tie with many rows
        elif kind == "sorted":
            scores.sort()
        rows = index_module.best_rows(scores)
        best = np.argsort(scores, kind="stable")[-index_module.SKETCH_CANDIDATES :]
        assert len(rows) >= index_module.SKETCH_CANDIDATES
        assert float(scores[rows].min()) <= float(scores[best].min())  # no better row left out
        assert set(rows.tolist()) >= {r for r in best.tolist() if scores[r] > scores[rows].min()}


def test_a_sketched_partition_stays_consistent_under_eviction() -> None:
    """Removals move the last row (and its sketch) into the gap: every live entry is still
    found as itself."""
    rng = np.random.default_rng(12)
    dim, bound = 256, 4_500
    vectors = _embedding_like(rng, 6_000, dim)

    async def main() -> None:
        index = MemoryIndex(bound)
        for i, vector in enumerate(vectors):
            index.put("p", vector, b"%d" % i, 3600)
        assert len(index) == bound and index.evicted == 6_000 - bound
        for i in rng.choice(np.arange(6_000 - bound, 6_000), 200, replace=False):
            found = await index.nearest("p", vectors[i], 1e-4)
            assert found is not None and found[0] == b"%d" % i

    asyncio.run(main())


@pytest.mark.parametrize(
    ("dim", "bound", "max_rows", "doubled_to"),
    [(256, 3_000, None, 2_048), (1536, 10**6, None, 256), (256, 3_000, 1_500, 1_024)],
)
def test_a_large_partition_gets_its_room_once(
    dim: int, bound: int, max_rows: int | None, doubled_to: int
) -> None:
    """A partition's matrices double while that copies at most GROW_BYTES; then they are made
    once with room for every row the partition may hold (the index's bound, a caller's
    `max_rows`, at most RESERVE_BYTES of vectors), and every row is still found after the
    moves. Doubling large matrices stalled the event loop for 26-145 ms (bench.fill)."""
    rng = np.random.default_rng(14)
    room = min(bound, max_rows or bound, index_module.RESERVE_BYTES // (4 * dim))
    stored = _embedding_like(rng, min(room, 3_000), dim)

    async def main() -> None:
        index = MemoryIndex(bound, max_rows=max_rows)
        capacities = [4]
        for i, vector in enumerate(stored):
            index.put("p", vector, b"%d" % i, 3600)
            part = index._partitions["p"]
            if len(part.vectors) != capacities[-1]:
                capacities.append(len(part.vectors))
            assert part.sketch is not None
            assert len(part.expires) == len(part.sketch) == len(part.vectors)
        doublings = [4 << k for k in range(doubled_to.bit_length() - 2)]
        assert capacities == [*doublings, room]  # the room made once: every later put fit
        for i in rng.choice(len(stored), 100, replace=False):
            found = await index.nearest("p", stored[i], 1e-4)
            assert found is not None and found[0] == b"%d" % i

    asyncio.run(main())


def test_entries_round_trip_and_mark_the_usage_chunk() -> None:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stored = entries.stream(events, "m", ("stop",))
    assert stored.usage_at == 2 and stored.streamed
    assert entries.decode(entries.encode(stored)) == stored
    whole = entries.whole(b"{}", "application/json", "m", ("stop",))
    assert entries.decode(entries.encode(whole)) == whole and not whole.streamed
    assert entries.decode(b"\x00garbage") is None
    assert entries.completes(events[3]) and not entries.completes(events[0])


def test_what_completes_a_responses_reply() -> None:
    def event(kind: str, **more: Any) -> bytes:
        data = json.dumps({"type": kind, **more}).encode()
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)

    assert entries.completes_response(event("response.completed", response={"status": "completed"}))
    assert entries.completes_response(b'data: {"type":"response.completed"}\n\n')  # no event:
    for other in ("response.incomplete", "response.failed", "response.output_text.done"):
        assert not entries.completes_response(event(other))
    # a delta that says it does not end the stream
    assert not entries.completes_response(
        event("response.output_text.delta", delta="response.completed")
    )
    assert not entries.completes_response(b"event: response.completed\ndata: {oops\n\n")
    assert not entries.completes_response(b"data: [DONE]\n\n")
    assert entries.is_complete_response(b'{"object":"response","status":"completed"}')
    for body in (b'{"status":"incomplete"}', b'{"status":"failed"}', b"{}", b"[]", b"oops"):
        assert not entries.is_complete_response(body)


def _cache(**lookup: Any) -> SemanticCache:
    from proxy.cache.policy import CacheMetrics, Outage
    from proxy.config import CacheLookup

    spec = CacheLookup(score_threshold=0.1, embeddings_backend_id="e", **lookup)
    return SemanticCache(spec, None, None, MemoryIndex(), CacheMetrics(None), Outage())  # type: ignore[arg-type]


def test_what_is_embedded() -> None:
    cache = _cache()
    system = Message("system", "Be brief.")
    assert text(cache, ChatRequest("m", [system, Message("user", FRANCE)])) == FRANCE
    two = ChatRequest("m", [Message("user", "Hi"), Message("assistant", "Hello")])
    assert text(cache, two) == "user: Hi\nassistant: Hello"
    parts = [ContentPart("text", "a"), ContentPart("text", "b")]
    assert text(cache, ChatRequest("m", [Message("user", parts)])) == "a\nb"
    image = [ContentPart("text", "what is this?"), ContentPart("image_url", image_url="u")]
    assert text(cache, ChatRequest("m", [Message("user", image)])) is None
    assert text(cache, ChatRequest("m", [system])) is None  # nothing left to embed
    assert text(cache, ChatRequest("m", [Message("user", "  ")])) is None
    assert text(
        _cache(ignore_system_messages=False), ChatRequest("m", [system, Message("user", "Q")])
    ) == ("system: Be brief.\nuser: Q")
    assert text(cache, CompletionRequest("m", prompt="Once")) == "Once"
    assert text(cache, CompletionRequest("m", prompt=["Once"])) == "Once"
    assert text(cache, CompletionRequest("m", prompt=["a", "b"])) is None
    assert text(cache, CompletionRequest("m", prompt=[1, 2])) is None


def text(cache: SemanticCache, view: Any, fields: dict[str, msgspec.Raw] | None = None) -> Any:
    return cache.text(view, fields or {})


def _embedded(body: dict[str, Any], **lookup: Any) -> str | None:
    """What the cache embeds of a Responses request body, as the gateway decodes it."""
    raw = json.dumps({"model": "m", **body}).encode()
    view = decode_request("responses", raw)
    assert isinstance(view, ResponsesRequest)
    return _cache(**lookup).text(view, msgspec.json.decode(raw, type=dict[str, msgspec.Raw]))


def _message(role: str, *parts: tuple[str, str]) -> dict[str, Any]:
    content = [{"type": kind, "text": text} for kind, text in parts]
    return {"type": "message", "role": role, "content": content}


_CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
_CALL_OUTPUT = {"type": "function_call_output", "call_id": "c1", "output": "42"}
_REASONING = {"type": "reasoning", "id": "rs_1", "summary": []}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"input": FRANCE}, FRANCE),
        ({"input": FRANCE, "instructions": "Be brief."}, FRANCE),
        ({"input": [{"role": "user", "content": FRANCE}]}, FRANCE),
        ({"input": [_message("user", ("input_text", "a"), ("input_text", "b"))]}, "a\nb"),
        ({"input": [{"role": "user", "content": "Hi"}, _message("assistant", ("output_text", "Hello")),
                    {"role": "user", "content": "Q"}]},
         "user: Hi\nassistant: Hello\nuser: Q"),
        ({"input": [{"role": "developer", "content": "Be brief."},
                    {"role": "system", "content": "No."}, {"role": "user", "content": "Q"}]}, "Q"),
        ({"input": FRANCE, "store": True, "previous_response_id": None}, FRANCE),
        # skipped: state the backend keeps
        ({"input": FRANCE, "previous_response_id": "resp_1"}, None),
        ({"input": FRANCE, "conversation": "conv_1"}, None),
        ({"input": FRANCE, "conversation": {"id": "conv_1"}}, None),
        ({"input": FRANCE, "prompt": {"id": "pmpt_1", "variables": {"x": "y"}}}, None),
        # skipped: items and parts the text cannot stand for
        ({"input": [{"role": "user", "content": "Q"}, _CALL, _CALL_OUTPUT]}, None),
        ({"input": [_REASONING, {"role": "user", "content": "Q"}]}, None),
        ({"input": [_message("user", ("input_text", "what is this?"), ("input_image", ""))]}, None),
        ({"input": [_message("user", ("input_text", "sum up"), ("input_file", ""))]}, None),
        ({"input": [_message("user", ("input_audio", ""))]}, None),
        ({"input": [{"type": "message", "role": "assistant",
                     "content": [{"type": "refusal", "refusal": "No."}]}]}, None),
        ({"input": ["not an item"]}, None),
        ({"input": [{"content": "no role"}]}, None),
        # nothing to embed
        ({"input": "  "}, None),
        ({"input": []}, None),
        ({"instructions": "Be brief."}, None),
        ({"input": [{"role": "system", "content": "Be brief."}]}, None),
    ],
)  # fmt: skip
def test_what_is_embedded_of_a_responses_request(
    body: dict[str, Any], expected: str | None
) -> None:
    assert _embedded(body) == expected


def test_responses_instructions_and_system_items_count_without_ignore_system_messages() -> None:
    asked = {"input": "Q", "instructions": "Be brief."}
    assert _embedded(asked, ignore_system_messages=False) == "system: Be brief.\nuser: Q"
    items = {
        "input": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    }
    assert _embedded(items, ignore_system_messages=False) == "developer: Be brief.\nuser: Q"
    two = {"input": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Q"}]}
    assert _embedded({**two, "instructions": "Be brief."}, max_message_count=2) is not None
    assert _embedded({**two, "instructions": "Be brief."}, max_message_count=2,
                     ignore_system_messages=False) is None  # fmt: skip


class _Named:
    name = "test"


def _partition(body: dict[str, Any], operation: str = "responses") -> str:
    spec_cache = _cache()
    cache = SemanticCache(spec_cache.spec, None, _Named(), MemoryIndex(),  # type: ignore[arg-type]
                          spec_cache.metrics, spec_cache.outage)  # fmt: skip
    raw = json.dumps(body).encode()
    view = decode_request(operation, raw)
    assert isinstance(view, ChatRequest | CompletionRequest | ResponsesRequest)
    exchange = Exchange("POST", RESPONSES, "r1", "127.0.0.1")
    exchange.api_id, exchange.operation, exchange.subscription_id = "chat", operation, "team-a"
    fields = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    return cache.partition(view, fields, exchange, {"headers": []}, "")


@pytest.mark.parametrize(
    ("other", "same"),
    [
        ({"input": SPAIN}, True),  # the conversation: what is embedded, not the partition
        ({"input": [{"role": "user", "content": FRANCE}]}, True),
        ({"user": "someone"}, True),
        ({"instructions": "Answer like a pirate."}, False),  # in, even when not embedded
        ({"store": True}, False),
        ({"max_output_tokens": 5}, False),
        ({"temperature": 0.2}, False),
        ({"text": {"format": {"type": "json_object"}}}, False),
        ({"stream_options": {"include_obfuscation": False}}, False),  # replayed as stored
        ({"stream": True}, False),
        ({"model": "gpt-4o"}, False),
    ],
)
def test_what_partitions_responses_entries(other: dict[str, Any], same: bool) -> None:
    base = responses(FRANCE, instructions="Be brief.")
    assert (_partition({**base, **other}) == _partition(base)) is same


def test_responses_and_chat_entries_never_mix() -> None:
    assert _partition(responses(FRANCE)) != _partition(chat(FRANCE), "chat-completions")


# --- config and /openapi.json --------------------------------------------------------------

LOOKUP_PATH = "apis[0].policies[0].llm-semantic-cache-lookup"


@pytest.mark.parametrize(
    ("lookup", "expected"),
    [
        ("score-threshold: 0, embeddings-backend-id: embeddings", "score-threshold: must be in"),
        ("score-threshold: 2.5, embeddings-backend-id: embeddings", "score-threshold: must be in"),
        ("score-threshold: 0.1", "embeddings-backend-id: required with embedder: backend"),
        ("score-threshold: 0.1, embedder: local, embeddings-backend-id: embeddings",
         "embeddings-backend-id: not used with embedder: local"),
        ("score-threshold: 0.1, embedder: onnx", "embedder: invalid enum value"),
        ("score-threshold: 0.1, embeddings-backend-id: embeddings, timeout: 2m",
         "timeout: at most 60s"),
        ("score-threshold: 0.1, embeddings-backend-id: embeddings, max-entries: 0",
         "max-entries: expected int >= 1"),
        ("score-threshold: 0.1, embeddings-backend-id: embeddings, max-message-count: 0",
         "max-message-count: expected int >= 1"),
        ("score-threshold: 0.1, embeddings-backend-id: embeddings, vary-by: ['{user.id}']",
         "vary-by: unknown placeholder {user.id}"),
        ("score-threshold: 0.1, embeddings-backend-id: embeddings, cache-id: x",
         "cache-id: unknown field"),
        ("score-threshold: 0.1, embeddings-backend-id: embedings",
         "embeddings-backend-id: unknown backend 'embedings' (did you mean 'embeddings'?)"),
        ("score-threshold: 0.1, embeddings-backend-id: embeddings, embeddings-model: ''",
         "embeddings-model: must not be empty"),
    ],
)  # fmt: skip
def test_bad_lookup_attributes_are_config_errors(lookup: str, expected: str) -> None:
    text = config_text("http://127.0.0.1:1/v1").replace(
        "{score-threshold: 0.15, embeddings-backend-id: embeddings}", "{" + lookup + "}"
    )
    with pytest.raises(ConfigError) as caught:
        loads(text)
    assert f"{LOOKUP_PATH}.{expected}" in str(caught.value)


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("duration: 0s", "duration: duration must be positive"),
        ("duration: soon", "duration:"),
        ("{}", "duration: required field is missing"),
        ("duration: 1h, cache-response: maybe", "cache-response: expected bool"),
    ],
)
def test_bad_store_attributes_are_config_errors(store: str, expected: str) -> None:
    text = config_text("http://127.0.0.1:1/v1", store=store).replace("{{}}", "{}")
    with pytest.raises(ConfigError) as caught:
        loads(text)
    assert f"apis[0].policies[1].llm-semantic-cache-store.{expected}" in str(caught.value)


def test_cache_response_false_only_reads(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        for _ in range(2):
            assert (await client.post(chat(FRANCE))).cache == "MISS"

    run(config_text(backend.url, store="duration: 1h, cache-response: false"), scenario)


def test_openapi_documents_x_cache_on_cached_operations() -> None:
    async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
        reply = await client.get("/openapi.json")
        document: dict[str, Any] = reply.json()
        return document

    from tests.inprocess import run_app

    document = run_app(loads(config_text("http://127.0.0.1:1/v1")), lambda c, _: scenario(c))
    paths = document["paths"]

    def headers(path: str) -> dict[str, Any]:
        found: dict[str, Any] = paths[path]["post"]["responses"]["200"]["headers"]
        return found

    for path in ("/openai/chat/completions", "/openai/completions", "/openai/responses"):
        assert headers(path)["x-cache"]["schema"] == {"enum": ["HIT", "MISS", "SKIP"]}
        assert "x-cache-distance" in headers(path)
    assert "x-cache" not in headers("/openai/embeddings")
    assert "x-cache" not in headers("/plain/chat/completions")


# --- the index in force: Redis with vector search, else in-process -------------------------


def _with_store(text: str, url: str) -> str:
    return f"gateway: {{store: '{url}'}}\n" + text


@pytest.mark.redis
def test_a_redis_store_without_vector_search_keeps_the_in_process_index(
    backend: MockProc, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.redisproc import running_server

    async def scenario(client: Client) -> None:
        slot = client.app.runtime.caches[0].all[0].index
        assert isinstance(slot, IndexSlot) and isinstance(slot.current, MemoryIndex)
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        assert (await client.post(chat(FRANCE))).cache == "HIT"

    with running_server() as server, caplog.at_level(logging.WARNING, logger="tollway"):
        run(_with_store(config_text(backend.url), server.url), scenario)
    assert any("uses the in-process index" in r.getMessage() for r in caplog.records)


@pytest.mark.redis
def test_gateways_on_one_redis_with_vector_search_share_entries(
    backend: MockProc, clean: RedisProc
) -> None:
    """Two gateways on one server share entries: first through the server's search, then,
    once the second has copied the partition (proxy/cache/mirror.py), through its copy,
    which learns of the first gateway's new entries from the stream."""
    from proxy.cache.redisindex import RedisIndex

    async def main(url: str) -> None:
        text = _with_store(config_text(backend.url), url)
        apps = [create_app(loads(text)), create_app(loads(text))]
        for app in apps:
            await app.startup(telemetry=False)
        try:
            one, two = Client(apps[0]), Client(apps[1])
            slot = apps[0].runtime.caches[0].all[0].index
            assert isinstance(slot, IndexSlot) and isinstance(slot.current, RedisIndex)
            first = await one.post(chat(FRANCE))
            assert first.cache == "MISS"
            shared = await two.post(chat(FRANCE_2))
            assert shared.cache == "HIT" and shared.body == first.body
            assert (await two.post(chat(FRANCE), B)).cache == "MISS"  # still per subscription
            live = await two.post(chat(POEM, stream=True))
            replayed = await one.post(chat(POEM, stream=True))
            assert (live.cache, replayed.cache) == ("MISS", "HIT")
            assert replayed.bodies == live.events()
            # the second gateway's copy of the partition: a new entry from the first reaches it
            index = apps[1].runtime.caches[0].all[0].index.current
            assert isinstance(index, RedisIndex)
            (mirror,) = index.mirrors()  # one embedder, one dimension
            with clean.client() as redis:  # the first entry (FRANCE, subscription A's)
                tag = redis.xrange(mirror.stream, count=1)[0][1][b"p"].decode()
            deadline = time.monotonic() + 5
            while tag not in mirror.copied:  # a lookup there asks for the copy
                assert time.monotonic() < deadline
                await two.post(chat(POEM))
                await asyncio.sleep(0.02)
            stored = await one.post(chat(SPAIN))
            assert stored.cache == "MISS"
            rows = mirror.index.count(tag)
            while mirror.index.count(tag) == rows:  # the follower reads it from the stream
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            hit = await two.post(chat(SPAIN))
            assert hit.cache == "HIT" and hit.body == stored.body
            assert tag in mirror.copied  # answered through the copy
            gauges = {g.name: g.points for g in apps[1].cache_parts.gauges()}
            assert gauges == {"tollway.cache.copied": (((), len(mirror.index)),)}
            assert len(mirror.index) >= 3  # FRANCE, POEM and SPAIN, at least
        finally:
            for app in apps:
                await app.shutdown()

    asyncio.run(main(clean.url))


# --- the local embedder, wired by name -----------------------------------------------------


def _local(text: str) -> str:
    return text.replace("embeddings-backend-id: embeddings", "embedder: local")


def test_the_local_embedder_serves_lookups_without_an_embeddings_backend(
    backend: MockProc,
) -> None:
    pytest.importorskip("onnxruntime", reason="the local-embeddings extra is not installed")

    async def scenario(client: Client) -> None:
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        hit = await client.post(chat("what's the capital of france"))
        assert hit.cache == "HIT" and float(hit.headers["x-cache-distance"]) < 0.15
        assert (await client.post(chat(POEM))).cache == "MISS"

    run(_local(config_text(backend.url)), scenario)
    assert backend_calls(backend, "/v1/embeddings") == 0


def test_the_local_embedder_without_its_extra_is_a_clear_start_up_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "proxy.cache.local", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"embedder: local needs the extra local-embeddings"):
        create_app(loads(_local(config_text("http://127.0.0.1:1/v1"))))


def test_entries_survive_a_config_reload(backend: MockProc, tmp_path: Any) -> None:
    path = tmp_path / "tollway.yaml"
    path.write_text(config_text(backend.url))

    async def main() -> None:
        app = create_app(loads(path.read_text()), config_path=str(path))
        await app.startup(telemetry=False)
        client = Client(app)
        try:
            assert (await client.post(chat(FRANCE))).cache == "MISS"
            path.write_text(config_text(backend.url, store="duration: 2h"))
            assert await app.reload()
            assert (await client.post(chat(FRANCE))).cache == "HIT"
            path.write_text(config_text(backend.url, lookup=", max-entries: 5"))
            assert await app.reload()  # another bound: another index, the old one let go
            assert (await client.post(chat(FRANCE))).cache == "MISS"
            assert list(app.cache_parts._slots) == [5]
        finally:
            await app.shutdown()

    asyncio.run(main())


def test_a_hit_is_served_when_the_token_window_is_spent(backend: MockProc) -> None:
    limit = "      - llm-token-limit: {tokens-per-minute: 30}"

    async def scenario(client: Client) -> None:
        first = await client.post(chat(FRANCE))
        assert first.status == 200 and first.json()["usage"]["total_tokens"] > 20
        assert (await client.post(chat(POEM))).status == 429  # the window is spent
        hit = await client.post(chat(FRANCE))
        assert (hit.status, hit.cache, hit.body) == (200, "HIT", first.body)

    run(config_text(backend.url, api_policies=limit), scenario)


def test_a_stream_the_client_left_is_not_stored(paced_mock: MockProc) -> None:
    async def scenario(client: Client) -> None:
        left = await client.post(chat(FRANCE, stream=True), leave_after=3)
        assert left.cache == "MISS" and b"[DONE]" not in left.body
        whole = await client.post(chat(FRANCE, stream=True))
        assert whole.cache == "MISS" and whole.events()[-1] == b"data: [DONE]\n\n"
        assert (await client.post(chat(FRANCE, stream=True))).cache == "HIT"

    run(config_text(paced_mock.url), scenario)


def test_concurrent_misses_for_one_prompt_keep_one_entry(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        replies = await asyncio.gather(*(client.post(chat(FRANCE)) for _ in range(10)))
        assert {r.status for r in replies} == {200}
        await client.settle()
        slot = client.app.runtime.caches[0].all[0].index
        assert isinstance(slot, IndexSlot) and isinstance(slot.current, MemoryIndex)
        assert len(slot.current) == 1
        assert (await client.post(chat(FRANCE))).cache == "HIT"

    run(config_text(backend.url), scenario)


def test_operations_the_cache_does_not_serve_carry_no_x_cache(backend: MockProc) -> None:
    async def scenario(client: Client) -> None:
        embeddings = await client.post(
            {"model": "text-embedding-3-small", "input": FRANCE}, path="/openai/embeddings"
        )
        assert embeddings.status == 200 and "x-cache" not in embeddings.headers

    run(config_text(backend.url), scenario)
    assert backend_calls(backend, "/v1/embeddings") == 1  # the client's own, no lookup's


def test_a_gateway_without_a_lookup_never_imports_the_cache() -> None:
    import subprocess
    import sys

    code = (
        "import sys, asyncio\n"
        "from proxy.app import create_app\n"
        "from proxy.config import loads\n"
        f"app = create_app(loads({config_text('http://127.0.0.1:1/v1')!r}"
        ".split('    policies:')[0] + 'subscriptions: []\\n'))\n"
        "asyncio.run(app.startup(telemetry=False)); asyncio.run(app.shutdown())\n"
        "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith('proxy.cache.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # no numpy (~13 MB, 50 ms) for gateways without a cache: only the light parts holder
    assert out.stdout.strip() == "['proxy.cache.parts']"


def test_embeddings_are_asked_as_base64_and_as_floats_from_a_backend_that_refuses_it(
    backend: MockProc,
) -> None:
    """base64 first (the vector's bytes straight into numpy); a backend answering that with a
    400 is asked for floats from then on, and the cache works the same."""
    import urllib.request

    asked: list[str] = []

    def floats_only(body: bytes) -> tuple[int, bytes]:
        encoding = json.loads(body).get("encoding_format", "float")
        asked.append(encoding)
        if encoding != "float":
            return 400, b'{"error": {"message": "encoding_format"}}'
        forward = urllib.request.Request(backend.url + "/embeddings", body,
                                         {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(forward) as answer:
            return 200, answer.read()

    async def scenario(client: Client) -> None:
        assert (await client.post(chat(FRANCE))).cache == "MISS"
        assert (await client.post(chat(FRANCE_2))).cache == "HIT"

    with embeddings_server(floats_only) as url:
        run(config_text(backend.url, embeddings_url=url), scenario)
    assert asked[0] == "base64" and set(asked[1:]) == {"float"} and len(asked) >= 3

    seen: list[str] = []
    before = len(backend.requests())

    async def direct(client: Client) -> None:
        assert (await client.post(chat(POEM))).cache == "MISS"
        assert (await client.post(chat(POEM))).cache == "HIT"
        for record in backend.requests()[before:]:
            if record["path"] == "/v1/embeddings":
                seen.append(json.loads(record["body"]).get("encoding_format", "float"))

    run(config_text(backend.url), direct)
    assert seen and set(seen) == {"base64"}  # the mock takes it: never floats
