"""The official OpenAI SDK works unchanged through the gateway, for every operation."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import BACKEND_SECRET, KEY
from tests.gatewayproc import GatewayProc
from tests.mockproc import MockProc

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something about gateways."}]


@pytest.fixture
def client(gateway: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base + "/openai", api_key=KEY, max_retries=0)


@pytest.fixture
def direct(mock: MockProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=mock.url, api_key="unused", max_retries=0)


def test_chat_completion_matches_the_backend(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    through = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    straight = direct.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert through.choices[0].message.content == straight.choices[0].message.content
    assert through.usage is not None and through.usage == straight.usage
    assert through.model == MODEL


def test_chat_stream_without_usage_request_gets_no_usage_chunk(
    client: openai.OpenAI, mock: MockProc
) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        text
        == client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content
    )  # type: ignore[arg-type]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ... although the gateway asked the backend for it, to meter the stream.
    sent = [r for r in mock.requests() if r["path"].endswith("/chat/completions")]
    assert any('"include_usage":true' in r["body"] for r in sent)


def test_chat_stream_with_usage_request_keeps_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time")
    parts = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Once upon a time", stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert all(p.usage is None for p in parts)


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    as_base64 = client.embeddings.create(model="text-embedding-3-small", input=["a cat", "a dog"])
    as_float = client.embeddings.create(
        model="text-embedding-3-small", input=["a cat", "a dog"], encoding_format="float"
    )
    assert len(as_base64.data) == 2
    assert as_base64.data[0].embedding == pytest.approx(as_float.data[0].embedding, abs=1e-6)
    assert as_base64.usage.prompt_tokens > 0


def test_responses_streaming_and_not(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input="Tell me a story")
    assert whole.output_text and whole.usage is not None
    events = list(client.responses.create(model=MODEL, input="Tell me a story", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    assert events[-1].type == "response.completed"


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_async_client_concurrent_streams(gateway: GatewayProc) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=gateway.base + "/openai", api_key=KEY, max_retries=0)
        async with client:

            async def one(i: int) -> str:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"n{i}"}], stream=True
                )
                return "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )

            return await asyncio.gather(*(one(i) for i in range(20)))

    texts = asyncio.run(run())
    assert len(texts) == 20 and all(t == texts[0] and t for t in texts)


def test_backend_credentials_replace_the_client_key(client: openai.OpenAI, mock: MockProc) -> None:
    mock.clear()
    client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    (request,) = mock.requests()
    headers = {k.lower(): v for k, v in request["headers"]}
    assert headers["authorization"] == BACKEND_SECRET
    assert KEY not in str(request["headers"])


def test_backend_error_passes_through_unchanged(
    client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    headers = {"x-mock-status": "429", "x-mock-retry-after": "7"}
    with pytest.raises(openai.RateLimitError) as through:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as straight:
        direct.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    assert through.value.body == straight.value.body
    assert through.value.response.headers["retry-after"] == "7"
