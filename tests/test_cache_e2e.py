"""The semantic cache end to end: a real `tollway serve` in front of a real `tollway mock-llm`
(its embeddings are deterministic), driven by the official OpenAI SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY, KEY_B
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc, free_port

ADMIN_KEY = "admin-key-0123456789abcdefghij"
FRANCE = "What is the capital of France?"
FRANCE_2 = "What is the capital city of France?"
POEM = "Write a poem about the sea and sailors"


def config(mock_url: str, embeddings_url: str) -> str:
    return f"""
gateway:
  admin-key: {ADMIN_KEY}
backends:
  - id: mock
    url: {mock_url}
  - id: embeddings
    url: {embeddings_url}
    timeout: {{connect: 1s, read: 2s}}
apis:
  - id: chat
    path: /openai
    backend: mock
    policies:
      - llm-token-limit: {{counter-key: "{{subscription.id}}", tokens-per-minute: 100000}}
      - llm-semantic-cache-lookup:
          score-threshold: 0.15
          embeddings-backend-id: embeddings
          timeout: 300ms
      - llm-semantic-cache-store: {{duration: 1h}}
  - id: broken
    path: /broken
    backend: mock
    policies:
      - llm-semantic-cache-lookup:
          score-threshold: 0.15
          embeddings-backend-id: nowhere
          timeout: 300ms
      - llm-semantic-cache-store: {{duration: 1h}}
  - id: dead
    path: /dead
    backend: mock
subscriptions:
  - id: team-a
    primary-key: {KEY}
  - id: team-b
    primary-key: {KEY_B}
"""


@pytest.fixture(scope="module")
def cached(mock: MockProc) -> Iterator[GatewayProc]:
    text = config(mock.url, mock.url)
    nowhere = f"  - id: nowhere\n    url: http://127.0.0.1:{free_port()}/v1\napis:"
    proc = start_gateway(text.replace("apis:", nowhere, 1))
    yield proc
    proc.stop()


def client(gw: GatewayProc, key: str = KEY, path: str = "/openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base + path, api_key=key, max_retries=0, timeout=10)


def ask(sdk: openai.OpenAI, text: str) -> tuple[Any, httpx.Headers]:
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )
    return raw.parse(), raw.headers


def stream(
    sdk: openai.OpenAI, text: str, **more: Any
) -> tuple[list[dict[str, Any]], httpx.Headers]:
    with sdk.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True, **more
    ) as raw:
        chunks = [chunk.model_dump() for chunk in raw.parse()]
        return chunks, raw.headers


def usage(gw: GatewayProc, counter: str) -> int:
    reply = httpx.get(gw.base + "/admin/usage", params={"counter-key": counter},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
    assert reply.status_code == 200, reply.text
    used: int = reply.json()["limits"][0]["tokens-in-window"]
    return used


def test_the_sdk_gets_misses_then_hits_for_the_same_and_similar_prompts(
    cached: GatewayProc, mock: MockProc
) -> None:
    sdk = client(cached)
    first, headers = ask(sdk, FRANCE)
    assert headers["x-cache"] == "MISS"
    before = usage(cached, "team-a")
    assert before >= first.usage.total_tokens
    for text in (FRANCE, FRANCE_2):
        hit, headers = ask(sdk, text)
        assert headers["x-cache"] == "HIT" and float(headers["x-cache-distance"]) <= 0.15
        assert hit.model_dump() == first.model_dump()
    assert usage(cached, "team-a") == before  # hits are charged nothing
    other, headers = ask(sdk, POEM)
    assert headers["x-cache"] == "MISS" and other.id != first.id
    # another tenant never gets team-a's answer
    theirs, headers = ask(client(cached, KEY_B), FRANCE)
    assert headers["x-cache"] == "MISS" and theirs.id != first.id
    # the access log says what the cache did, for the last request a miss from the backend
    rid = headers["x-request-id"]
    deadline = time.monotonic() + 3
    while not (lines := [x for x in cached.access_log() if x["request_id"] == rid]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert lines[0]["cache"] == "miss" and lines[0]["backend"] is not None
    hits = [x for x in cached.access_log() if x["cache"] == "hit"]
    assert len(hits) >= 2 and all(x["backend"] is None for x in hits[:2])


def test_a_streamed_hit_replays_the_same_chunks(cached: GatewayProc) -> None:
    sdk = client(cached)
    text = "Explain how tides work in one paragraph"
    live, headers = stream(sdk, text)
    assert headers["x-cache"] == "MISS" and headers["content-type"] == "text/event-stream"
    replayed, headers = stream(sdk, text)
    assert headers["x-cache"] == "HIT" and headers["x-cache-distance"] == "0.0000"
    assert replayed == live
    assert len(live) == 18 and live[-1]["choices"][0]["finish_reason"] == "stop"
    with_usage, _ = stream(sdk, text, stream_options={"include_usage": True})
    assert with_usage[:-1] == live and with_usage[-1]["usage"]["completion_tokens"] == 16


def test_an_interrupted_stream_is_not_stored(cached: GatewayProc) -> None:
    sdk = client(cached)
    text = "Name three rivers in Africa"
    with pytest.raises(openai.APIError):
        stream(sdk.with_options(default_headers={"x-mock-close-after": "4"}), text)
    _, headers = stream(sdk, text)
    assert headers["x-cache"] == "MISS"
    _, headers = stream(sdk, text)
    assert headers["x-cache"] == "HIT"


def test_an_unreachable_embeddings_backend_fails_open(cached: GatewayProc) -> None:
    sdk = client(cached, path="/broken")
    for _ in range(3):
        t = time.monotonic()
        reply, headers = ask(sdk, FRANCE)
        assert headers["x-cache"] == "MISS" and reply.choices[0].message.content
        assert time.monotonic() - t < 1.0
    log = cached.log()
    assert log.count("semantic cache lookup unavailable") == 1
    metrics = httpx.get(cached.base + "/metrics").text
    errors = 'tollway_cache_errors_total{tollway_cache_stage="lookup",error_type="unavailable"} 3'
    assert errors in metrics
    entries = next(
        line for line in metrics.splitlines() if line.startswith("tollway_cache_entries")
    )
    assert float(entries.split()[-1]) >= 3
    held = next(line for line in metrics.splitlines() if line.startswith("tollway_cache_bytes"))
    assert float(held.split()[-1]) >= float(entries.split()[-1]) * 100  # replies and vectors
    assert (
        'tollway_cache_lookups_total{tollway_api_id="broken",tollway_cache_result="error"} 3'
        in metrics
    )
    assert (
        'tollway_cache_lookups_total{tollway_api_id="chat",tollway_cache_result="hit"}' in metrics
    )


def test_openapi_json_documents_x_cache(cached: GatewayProc) -> None:
    document = httpx.get(cached.base + "/openapi.json").json()
    ok = document["paths"]["/openai/chat/completions"]["post"]["responses"]["200"]
    assert {"x-cache", "x-cache-distance"} <= set(ok["headers"])
    plain = document["paths"]["/dead/chat/completions"]["post"]["responses"]["200"]
    assert "x-cache" not in plain["headers"]


# --- the Responses API ---------------------------------------------------------------------


def respond(sdk: openai.OpenAI, text: str, **more: Any) -> tuple[Any, httpx.Headers]:
    raw = sdk.responses.with_raw_response.create(model="gpt-4o-mini", input=text, **more)
    return raw.parse(), raw.headers


def respond_streamed(
    sdk: openai.OpenAI, text: str, **more: Any
) -> tuple[list[dict[str, Any]], httpx.Headers]:
    with sdk.responses.with_streaming_response.create(
        model="gpt-4o-mini", input=text, stream=True, **more
    ) as raw:
        events = [event.model_dump() for event in raw.parse()]
        return events, raw.headers


def test_the_sdk_gets_responses_misses_then_hits(cached: GatewayProc) -> None:
    sdk = client(cached)
    first, headers = respond(sdk, FRANCE, instructions="Be brief.")
    assert headers["x-cache"] == "MISS" and first.status == "completed" and first.output_text
    before = usage(cached, "team-a")
    for text in (FRANCE, FRANCE_2):
        hit, headers = respond(sdk, text, instructions="Be brief.")
        assert headers["x-cache"] == "HIT" and float(headers["x-cache-distance"]) <= 0.15
        assert hit.model_dump() == first.model_dump() and hit.output_text == first.output_text
    assert usage(cached, "team-a") == before  # hits are charged nothing
    other, headers = respond(sdk, FRANCE, instructions="Answer like a pirate.")
    assert headers["x-cache"] == "MISS" and other.id != first.id
    theirs, headers = respond(client(cached, KEY_B), FRANCE, instructions="Be brief.")
    assert headers["x-cache"] == "MISS" and theirs.id != first.id


def test_a_streamed_responses_hit_replays_the_same_events(cached: GatewayProc) -> None:
    sdk = client(cached)
    text = "Explain how rainbows form in one paragraph"
    live, headers = respond_streamed(sdk, text)
    assert headers["x-cache"] == "MISS" and headers["content-type"] == "text/event-stream"
    assert live[-1]["type"] == "response.completed"
    deltas = "".join(e["delta"] for e in live if e["type"] == "response.output_text.delta")
    assert deltas and deltas == live[-1]["response"]["output"][0]["content"][0]["text"]
    before = usage(cached, "team-a")
    replayed, headers = respond_streamed(sdk, text)
    assert headers["x-cache"] == "HIT" and headers["x-cache-distance"] == "0.0000"
    assert replayed == live
    assert usage(cached, "team-a") == before
    whole, headers = respond(sdk, text)  # a stored stream answers only streaming requests
    assert headers["x-cache"] == "MISS" and whole.output_text == deltas


def test_responses_continuing_a_stored_one_skip_the_cache(cached: GatewayProc) -> None:
    sdk = client(cached)
    first, headers = respond(sdk, "Name a large ocean")
    assert headers["x-cache"] == "MISS"
    for _ in range(2):
        _, headers = respond(sdk, "Name a large ocean", previous_response_id=first.id)
        assert headers["x-cache"] == "SKIP"


@pytest.mark.parametrize("streamed", [False, True])
def test_an_incomplete_responses_reply_is_not_stored(cached: GatewayProc, streamed: bool) -> None:
    sdk = client(cached)
    text = f"Describe the water cycle ({'streamed' if streamed else 'whole'})"
    for _ in range(2):
        if streamed:
            events, headers = respond_streamed(sdk, text, max_output_tokens=5)
            assert events[-1]["type"] == "response.incomplete"
        else:
            reply, headers = respond(sdk, text, max_output_tokens=5)
            assert reply.status == "incomplete"
        assert headers["x-cache"] == "MISS"
