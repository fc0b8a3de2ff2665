"""The mock LLM backend, driven as a real Granian process by the official openai SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseCompletedEvent

from proxy.mock_llm import WORDS, app_factory, create_app
from tests.mockproc import MockProc, start_mock

TOKENS = 16
TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(TOKENS))
HELLO: Any = [{"role": "user", "content": "Say hello to the mock"}]  # 5 words + 3 = 8 tokens


def text_of(n: int) -> str:
    return " ".join(WORDS[:n])


@pytest.fixture(scope="module")
def backend() -> Iterator[MockProc]:
    proc = start_mock(tokens=TOKENS)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def paced_backend() -> Iterator[MockProc]:
    proc = start_mock(ttft_ms=200, itl_ms=50, tokens=40)
    yield proc
    proc.stop()


@pytest.fixture
def client(backend: MockProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=backend.url, api_key="sk-mock", max_retries=0) as sdk:
        yield sdk


def sse_events(raw: str) -> list[str]:
    return [event for event in raw.split("\n\n") if event]


def data_of(events: list[str]) -> list[Any]:
    return [json.loads(e[6:]) for e in events if e.startswith("data: {") and e != "data: [DONE]"]


# -- chat completions ---------------------------------------------------------------------------


def test_models_lists_chat_and_embedding_models(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert {"gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "llama-3-8b"} <= set(ids)


def test_chat_reply_is_deterministic_with_usage(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    again = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert first.object == "chat.completion"
    assert first.model == "gpt-4o-mini"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == TEXT == again.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (8, TOKENS)
    assert first.usage.total_tokens == 8 + TOKENS
    assert first.id.startswith("chatcmpl-") and first.id != again.id


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
def test_chat_token_cap_ends_with_length(client: openai.OpenAI, cap: str) -> None:
    limit: Any = {cap: 3}
    reply = client.chat.completions.create(model="m", messages=HELLO, **limit)
    assert reply.choices[0].message.content == text_of(3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_matches_non_streamed_reply(client: openai.OpenAI, include_usage: bool) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": include_usage},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == TEXT
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == TOKENS
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == "stop" and set(finished[:-1]) == {None}
    assert all(c.model == "gpt-4o" and c.id == chunks[0].id for c in chunks)
    if include_usage:
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, TOKENS)
    else:
        assert all(c.choices and c.usage is None for c in chunks)


def test_chat_stream_framing(backend: MockProc) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True, "max_tokens": 2}
    reply = httpx.post(backend.url + "/chat/completions", json=body)
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.headers["cache-control"] == "no-cache"
    events = sse_events(reply.text)
    assert reply.text.endswith("\n\n") and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert len(data_of(events)) == 1 + 2 + 1  # role, two tokens, finish


def test_chat_with_async_sdk(backend: MockProc) -> None:
    async def chat() -> tuple[str | None, str]:
        async with openai.AsyncOpenAI(base_url=backend.url, api_key="sk", max_retries=0) as sdk:
            reply = await sdk.chat.completions.create(model="m", messages=HELLO)
            stream = await sdk.chat.completions.create(model="m", messages=HELLO, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return reply.choices[0].message.content, text

    assert asyncio.run(chat()) == (TEXT, TEXT)


def test_prompt_tokens_count_text_parts(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
    ]
    reply = client.chat.completions.create(model="m", messages=messages)
    assert reply.usage is not None and reply.usage.prompt_tokens == (3 + 2) + (3 + 3)


# -- legacy completions -------------------------------------------------------------------------


def test_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="m", prompt="one two three four")
    assert reply.object == "text_completion"
    assert reply.choices[0].text == TEXT and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens == 4
    chunks = list(
        client.completions.create(
            model="m",
            prompt=[1, 2, 3],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_of(5)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 5)


# -- embeddings ---------------------------------------------------------------------------------


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    text = "What is the capital of France?"
    plain = client.embeddings.create(model="e", input=text, encoding_format="float")
    packed = client.embeddings.create(model="e", input=[text])  # the SDK asks for base64
    a, b = plain.data[0].embedding, packed.data[0].embedding
    assert len(a) == len(b) == 256
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    assert math.isclose(math.sqrt(cosine(a, a)), 1.0, rel_tol=1e-6)
    assert plain.usage.prompt_tokens == 6 and plain.usage.total_tokens == 6


def test_embeddings_similarity_tracks_text(client: openai.OpenAI) -> None:
    texts = [
        "What is the capital of France?",
        "what is the capital of france",
        "What is the capital of Germany?",
        "Explain quantum tunnelling in detail",
        "What is the capital of France?",
    ]
    reply = client.embeddings.create(model="e", input=texts, encoding_format="float")
    vectors = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
    same, near, far = (cosine(vectors[0], v) for v in vectors[1:4])
    assert vectors[0] == vectors[4]
    assert same > 0.99
    assert same > near + 0.2 > far + 0.4
    assert far < 0.3


def test_embeddings_dimensions_and_token_ids(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="e", input=[[1, 2, 3], [1, 2, 3]], dimensions=64)
    assert [len(item.embedding) for item in reply.data] == [64, 64]
    assert reply.data[0].embedding == reply.data[1].embedding
    assert reply.usage.prompt_tokens == 6


def test_embeddings_reject_bad_input(backend: MockProc) -> None:
    reply = httpx.post(backend.url + "/embeddings", json={"model": "e", "input": [1, "a"]})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


# -- responses ----------------------------------------------------------------------------------


def test_responses_plain(client: openai.OpenAI) -> None:
    reply = client.responses.create(
        model="gpt-4o-mini",
        input=[{"role": "user", "content": "one two"}, {"role": "user", "content": "three"}],
    )
    assert reply.id.startswith("resp_") and reply.status == "completed"
    assert reply.output_text == TEXT
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (3 + 2 + 3 + 1, TOKENS)
    assert reply.usage.input_tokens_details.cached_tokens == 0
    capped = client.responses.create(model="m", input="hi", max_output_tokens=2)
    assert capped.status == "incomplete" and capped.output_text == text_of(2)


def test_responses_stream_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="m", input="hello there", stream=True))
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * TOKENS,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert isinstance(events[-1], ResponseCompletedEvent)
    completed = events[-1].response
    assert deltas == completed.output_text == TEXT
    assert completed.usage is not None and completed.usage.output_tokens == TOKENS


def test_responses_stream_helper(backend: MockProc) -> None:
    async def final() -> str:
        async with (
            openai.AsyncOpenAI(base_url=backend.url, api_key="sk", max_retries=0) as sdk,
            sdk.responses.stream(model="m", input="hi") as stream,
        ):
            return (await stream.get_final_response()).output_text

    assert asyncio.run(final()) == TEXT


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/nothing", b"{}", 404),
        ("GET", "/v1/chat/completions", b"", 405),
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b'{"max_tokens": "many"}', 400),
        ("POST", "/chat/completions", b"[]", 400),
    ],
)
def test_errors_are_openai_shaped(
    backend: MockProc, method: str, path: str, body: bytes, status: int
) -> None:
    reply = httpx.request(method, backend.base + path, content=body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None and error["message"]
    if status == 405:
        assert reply.headers["allow"] == "POST"


def test_routes_work_without_v1_prefix(backend: MockProc) -> None:
    reply = httpx.post(backend.base + "/chat/completions", json={"model": "m", "messages": HELLO})
    assert reply.json()["choices"][0]["message"]["content"] == TEXT
    assert httpx.get(backend.base + "/models").json()["object"] == "list"


# -- fault injection ----------------------------------------------------------------------------


def test_injected_status_and_retry_after(backend: MockProc) -> None:
    headers = {"x-mock-status": "503", "x-mock-retry-after": "7"}
    reply = httpx.post(backend.url + "/chat/completions", json={}, headers=headers)
    assert reply.status_code == 503 and reply.headers["retry-after"] == "7"
    assert reply.json()["error"]["type"] == "server_error"
    plain = httpx.post(backend.url + "/embeddings", json={}, headers={"x-mock-status": "429"})
    assert plain.status_code == 429 and "retry-after" not in plain.headers
    assert plain.json()["error"]["message"]


def test_sticky_faults_match_headers_and_count_down(backend: MockProc) -> None:
    rule = {"faults": {"status": "500"}, "when": {"x-member": "a"}, "times": 2}
    backend.faults(
        rule, {"faults": {"status": "429", "retry-after": "3"}, "when": {"x-member": "b"}}
    )
    try:
        post = partial(httpx.post, backend.url + "/embeddings", json={"input": "x"})
        assert [post(headers={"x-member": "a"}).status_code for _ in range(3)] == [500, 500, 200]
        b = post(headers={"x-member": "b"})
        assert b.status_code == 429 and b.headers["retry-after"] == "3"
        assert post(headers={"x-member": "c"}).status_code == 200
        left = httpx.get(backend.base + "/_mock/faults").json()
        assert [r["times"] for r in left] == [0, None]
        bad = httpx.put(backend.base + "/_mock/faults", json=[{"faults": {"status": "x"}}])
        assert bad.status_code == 400
    finally:
        backend.faults()
    assert httpx.get(backend.base + "/_mock/faults").json() == []


@pytest.mark.parametrize("stream", [False, True])
def test_injected_delay_holds_back_headers(backend: MockProc, stream: bool) -> None:
    body = {"model": "m", "messages": HELLO, "stream": stream}
    started = time.monotonic()
    with httpx.stream(
        "POST", backend.url + "/chat/completions", json=body, headers={"x-mock-delay-ms": "300"}
    ) as reply:
        waited = time.monotonic() - started
        text = reply.read().decode()
    assert 0.28 <= waited < 5
    assert reply.status_code == 200 and TEXT.split()[-1] in text


@pytest.mark.parametrize("events", [0, 3])
def test_close_after_aborts_stream(backend: MockProc, events: int) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    received = b""
    url = backend.url + "/chat/completions"
    headers = {"x-mock-close-after": str(events)}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", url, json=body, headers=headers) as reply,
    ):
        assert reply.status_code == 200  # the headers made it out before the abort
        for chunk in reply.iter_raw():
            received += chunk
    assert len(sse_events(received.decode())) == events
    assert b"[DONE]" not in received


def test_close_after_aborts_json_reply(backend: MockProc) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(
            backend.url + "/chat/completions",
            json={"model": "m", "messages": HELLO},
            headers={"x-mock-close-after": "0"},
        )


def test_garbage_is_mixed_into_stream(backend: MockProc) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    reply = httpx.post(
        backend.url + "/chat/completions", json=body, headers={"x-mock-garbage": "1"}
    )
    events = sse_events(reply.text)
    assert "data: {not json" in events and ": mock comment" in events
    assert "garbage line without colon" in events
    assert events[-1] == "data: [DONE]"
    valid = [e for e in events if e.startswith('data: {"')]
    chunks = data_of(valid)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == TEXT


def test_bad_fault_header_is_400(backend: MockProc) -> None:
    reply = httpx.post(backend.url + "/chat/completions", json={}, headers={"x-mock-delay-ms": "x"})
    assert reply.status_code == 400 and "x-mock-delay-ms" in reply.json()["error"]["message"]


# -- x-mock-reply -------------------------------------------------------------------------------

REPLY = "Sure,  here is wörld's plan: step one"  # a double space makes an empty token
REPLY_TOKENS = REPLY.split(" ")  # ["Sure,", "", "here", ...]: 8 tokens
REPLY_HEADER = {b"x-mock-reply": REPLY.encode()}


def reply_prefix(n: int) -> str:
    return " ".join(REPLY_TOKENS[:n])


@pytest.mark.parametrize("cap", [None, 3, 100])
def test_reply_fault_chat(backend: MockProc, cap: int | None) -> None:
    n = len(REPLY_TOKENS) if cap is None else min(cap, len(REPLY_TOKENS))
    finish = "length" if n < len(REPLY_TOKENS) else "stop"
    body: dict[str, Any] = {"model": "m", "messages": HELLO, "max_tokens": cap}
    reply = httpx.post(backend.url + "/chat/completions", json=body, headers=REPLY_HEADER).json()
    assert reply["choices"][0]["message"]["content"] == reply_prefix(n)
    assert reply["choices"][0]["finish_reason"] == finish
    assert reply["usage"]["completion_tokens"] == n and reply["usage"]["prompt_tokens"] == 8
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    raw = httpx.post(backend.url + "/chat/completions", json=stream, headers=REPLY_HEADER).text
    chunks = data_of(sse_events(raw))
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert deltas == [REPLY_TOKENS[0]] + [" " + t for t in REPLY_TOKENS[1:n]]
    assert "".join(deltas) == reply_prefix(n)
    assert chunks[-2]["choices"][0]["finish_reason"] == finish
    assert chunks[-1]["usage"]["completion_tokens"] == n


@pytest.mark.parametrize("stream", [False, True])
def test_reply_fault_completions(client: openai.OpenAI, stream: bool) -> None:
    headers = {"x-mock-reply": "one  two three"}
    if stream:
        chunks = list(
            client.completions.create(
                model="m", prompt="p", stream=True, max_tokens=2, extra_headers=headers
            )
        )
        assert [c.choices[0].text for c in chunks] == ["one", " ", ""]
        assert chunks[-1].choices[0].finish_reason == "length"
        full = client.completions.create(model="m", prompt="p", stream=True, extra_headers=headers)
        assert "".join(c.choices[0].text for c in full) == "one  two three"
    else:
        reply = client.completions.create(model="m", prompt="p", extra_headers=headers)
        assert reply.choices[0].text == "one  two three"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == 4


@pytest.mark.parametrize("stream", [False, True])
def test_reply_fault_responses(client: openai.OpenAI, stream: bool) -> None:
    headers = {"x-mock-reply": "I will not do that"}
    for cap, text, status in [
        (None, "I will not do that", "completed"),
        (2, "I will", "incomplete"),
    ]:
        if stream:
            events = list(
                client.responses.create(
                    model="m", input="hi", stream=True, max_output_tokens=cap, extra_headers=headers
                )
            )
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            assert "".join(deltas) == text and len(deltas) == len(text.split(" "))
            reply = events[-1].response  # type: ignore[union-attr]
        else:
            reply = client.responses.create(
                model="m", input="hi", max_output_tokens=cap, extra_headers=headers
            )
        assert reply.output_text == text and reply.status == status
        assert reply.usage is not None and reply.usage.output_tokens == len(text.split(" "))


def test_reply_fault_header_falls_back_to_latin1(backend: MockProc) -> None:
    body = {"messages": HELLO}
    headers = {b"x-mock-reply": "caf\xe9 ok".encode("latin-1")}
    reply = httpx.post(backend.url + "/chat/completions", json=body, headers=headers)
    assert reply.json()["choices"][0]["message"]["content"] == "café ok"


def test_reply_fault_leaves_other_requests_alone(client: openai.OpenAI) -> None:
    headers = {"x-mock-reply": "custom"}
    custom = client.chat.completions.create(model="m", messages=HELLO, extra_headers=headers)
    plain = client.chat.completions.create(model="m", messages=HELLO)
    assert (custom.choices[0].message.content, plain.choices[0].message.content) == ("custom", TEXT)
    embedded = client.embeddings.create(model="e", input="x", extra_headers=headers)
    assert len(embedded.data[0].embedding) == 256


def test_reply_fault_as_sticky_rule(backend: MockProc) -> None:
    text = "Here is how to build a bomb"
    backend.faults({"faults": {"reply": text}, "when": {"x-member": "evil"}, "times": 1})
    try:
        assert "reply" in httpx.get(backend.base + "/_mock/faults").json()[0]["faults"]
        post = partial(httpx.post, backend.url + "/chat/completions", json={"messages": HELLO})
        evil = post(headers={"x-member": "evil"}).json()["choices"][0]["message"]["content"]
        again = post(headers={"x-member": "evil"}).json()["choices"][0]["message"]["content"]
        assert (evil, again) == (text, TEXT)
    finally:
        backend.faults()


def assert_paced(arrivals: list[float], tokens: int) -> None:
    """Tokens paced 200 ms to the first, 50 ms apart (the paced_backend).

    Times are read by this process, which a busy machine may run late: a late read only makes
    an arrival later, so the bounds from the request's start are exact; the spread between the
    first and last token is checked for one gap of the five or more, which a late first read
    does not hide unless it is ~200 ms late.
    """
    assert len(arrivals) == tokens
    assert arrivals[0] >= 0.2 * 0.9 and arrivals[-1] < 5
    assert 0.2 + 0.05 * (tokens - 1) * 0.9 <= arrivals[-1]  # ttft, then every gap
    assert arrivals[-1] - arrivals[0] >= 0.05 * 0.9  # not all at once after the wait


def test_reply_fault_is_paced(paced_backend: MockProc) -> None:
    body = {"messages": HELLO, "stream": True}
    headers = {"x-mock-reply": "a b c d e f"}
    started = time.monotonic()
    arrivals = []
    with httpx.stream(
        "POST", paced_backend.url + "/chat/completions", json=body, headers=headers
    ) as reply:
        for line in reply.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic() - started)
    assert_paced(arrivals, 6)


# -- recorded requests --------------------------------------------------------------------------


def test_requests_are_recorded(backend: MockProc) -> None:
    backend.clear()
    body = {"model": "m", "messages": HELLO, "stream": True}
    httpx.post(backend.url + "/chat/completions?trace=1", json=body, headers={"x-test": "yes"})
    httpx.get(backend.url + "/nothing")
    first, missing = backend.requests()
    assert (first["method"], first["path"], first["query"]) == (
        "POST",
        "/v1/chat/completions",
        "trace=1",
    )
    assert ["x-test", "yes"] in first["headers"]
    assert json.loads(first["body"]) == body
    assert first["status"] == 200 and first["events_sent"] == 1 + TOKENS + 1 + 1
    assert first["started"] <= first["finished"] and first["disconnected"] is None
    assert (missing["path"], missing["status"]) == ("/v1/nothing", 404)
    backend.clear()
    assert backend.requests() == []


def test_chunked_request_body_is_read_whole(backend: MockProc) -> None:
    backend.clear()
    body = json.dumps({"model": "m", "messages": HELLO, "max_tokens": 2}).encode()
    pieces = iter([body[:10], body[10:]])  # an iterator makes httpx send it chunked
    reply = httpx.post(backend.url + "/chat/completions", content=pieces)
    assert reply.json()["choices"][0]["message"]["content"] == text_of(2)
    (record,) = backend.requests()
    assert ["transfer-encoding", "chunked"] in record["headers"]
    assert record["body"] == body.decode()


def test_recorded_body_is_truncated(backend: MockProc) -> None:
    backend.clear()
    big = "word " * 30_000
    reply = httpx.post(backend.url + "/chat/completions", json={"messages": [{"content": big}]})
    assert reply.json()["usage"]["prompt_tokens"] == 30_000 + 3
    (record,) = backend.requests()
    assert len(record["body"]) == 64 * 1024


# -- pacing and disconnects ---------------------------------------------------------------------


def test_stream_pacing(paced_backend: MockProc) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True, "max_tokens": 6}
    started = time.monotonic()
    arrivals = []
    with httpx.stream("POST", paced_backend.url + "/chat/completions", json=body) as reply:
        headers_after = time.monotonic() - started
        for line in reply.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic() - started)
    assert_paced(arrivals, 6)
    assert headers_after < arrivals[0] - 0.1  # headers go out at once, not with the first token


def test_non_streamed_reply_waits_for_generation(paced_backend: MockProc) -> None:
    started = time.monotonic()
    reply = httpx.post(
        paced_backend.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 4}
    )
    assert reply.json()["usage"]["completion_tokens"] == 4
    assert 0.2 + 3 * 0.05 * 0.8 <= time.monotonic() - started < 3


def test_disconnect_is_recorded_promptly(paced_backend: MockProc) -> None:
    paced_backend.clear()
    body = {"model": "m", "messages": HELLO, "stream": True}  # 40 tokens: ~2.2 s
    with httpx.stream("POST", paced_backend.url + "/chat/completions", json=body) as reply:
        events = 0
        for line in reply.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
    closed = time.monotonic()  # CLOCK_MONOTONIC is shared by the processes of one host
    record = None
    while time.monotonic() - closed < 1.5:
        (record,) = paced_backend.requests()
        if record["disconnected"] is not None:
            break
        time.sleep(0.02)
    assert record is not None and record["disconnected"] is not None
    assert record["disconnected"] - closed < 1.0
    assert record["events_sent"] < 10
    time.sleep(0.3)  # six more tokens' worth: it must have stopped generating
    (later,) = paced_backend.requests()
    assert later["events_sent"] == record["events_sent"] and later["finished"] is None


def test_disconnect_during_delay_is_recorded(backend: MockProc) -> None:
    backend.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            backend.url + "/chat/completions",
            json={"messages": HELLO},
            headers={"x-mock-delay-ms": "3000"},
            timeout=0.2,
        )
    deadline = time.monotonic() + 1.5
    while (record := backend.requests()[0])["disconnected"] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert record["disconnected"] is not None and record["finished"] is None
    assert record["disconnected"] - record["started"] < 1.5


# -- in process ---------------------------------------------------------------------------------


async def call(app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[Any]:
    """Drive the ASGI app once; return what it sent."""
    sent: list[Any] = []
    inbox = iter(messages)

    async def receive() -> Any:
        return next(inbox)

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_lifespan_completes() -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = asyncio.run(call(create_app(), {"type": "lifespan"}, messages))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_app_factory_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_MOCK_TOKENS", "5")
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [],
    }
    request = {"type": "http.request", "body": b'{"messages": []}', "more_body": False}
    sent = asyncio.run(call(app_factory(), scope, [request]))
    reply = json.loads(sent[-1]["body"])
    assert reply["usage"]["completion_tokens"] == 5
    assert reply["choices"][0]["message"]["content"] == text_of(5)
