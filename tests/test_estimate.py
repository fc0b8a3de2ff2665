"""Prompt estimates and streamed completion counts (proxy/estimate.py).

A word counter stands in for the tokenizer where the arithmetic is the point, so every
expected figure can be checked by hand; the real tokenizers are tested in test_tokens.py.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from proxy.estimate import (
    PER_MESSAGE,
    REPLY_PRIMING,
    CompletionCounter,
    completion_reserve,
    image_size,
    image_tokens,
    prompt_tokens,
    tiles,
    tools_tokens,
)
from proxy.schemas import decode_request, max_tokens_of


def words(text: str) -> int:
    return len(text.split())


def chat(**fields: object) -> bytes:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def estimate(operation: str, body: bytes | dict[str, object]) -> int:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return prompt_tokens(decode_request(operation, raw), words)


def png(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


def gif(width: int, height: int) -> str:
    return (
        "data:image/gif;base64,"
        + base64.b64encode(b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 8).decode()
    )


def jpeg(width: int, height: int) -> str:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x00" * 9
    return (
        "data:image/jpeg;base64,"
        + base64.b64encode(b"\xff\xd8" + app0 + sof + b"\xff\xd9").decode()
    )


def webp_vp8x(width: int, height: int) -> str:
    body = (
        b"WEBPVP8X"
        + struct.pack("<I", 10)
        + b"\x00" * 4
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    return (
        "data:image/webp;base64,"
        + base64.b64encode(b"RIFF" + struct.pack("<I", len(body)) + body).decode()
    )


# -- chat arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # per message: 3 + role + content; the reply primer 3 once
        ([{"role": "user", "content": "hello there"}], 3 + 1 + 2 + 3),
        (
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}],
            (3 + 1 + 2) + (3 + 1 + 3) + 3,
        ),
        ([{"role": "user", "name": "ann lee", "content": "x"}], 3 + 1 + (1 + 2) + 1 + 3),
        ([{"role": "user", "content": None}], 3 + 1 + 3),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "one two"},
                        {"type": "text", "text": "three"},
                    ],
                }
            ],
            3 + 1 + 3 + 3,
        ),
        # system as a content-part array counts like any other content
        ([{"role": "system", "content": [{"type": "text", "text": "rule one"}]}], 3 + 1 + 2 + 3),
        # assistant tool calls: function name + arguments
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get weather", "arguments": "city Paris"},
                        }
                    ],
                }
            ],
            3 + 1 + 2 + 2 + 3,
        ),
        ([{"role": "tool", "tool_call_id": "c1", "content": "sunny and warm"}], 3 + 1 + 3 + 3),
    ],
)
def test_chat_messages(messages: list[dict[str, object]], expected: int) -> None:
    assert estimate("chat-completions", chat(messages=messages)) == expected


def test_tools_follow_the_cookbook_formula() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "the city name"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
            },
        },
    }
    # func_end 12 + func_init 7 + "get_weather:Get the weather" (3 words)
    # + prop_init 3 + city: 3 + "city:string:the city name" (3 words)
    # + unit: 3 + enum_init -3 + 2 x (3 + 1) + "unit:string:" (1 word)
    expected = 12 + 7 + 3 + 3 + (3 + 3) + (3 - 3 + 8 + 1)
    raw = decode_request("chat-completions", chat(tools=[tool]))
    assert raw.tools is not None
    assert tools_tokens(raw.tools, words) == expected
    assert estimate("chat-completions", chat(tools=[tool])) == 3 + 1 + 1 + 3 + expected


def test_tools_that_are_not_functions_count_as_their_json() -> None:
    tool = {"type": "web_search", "search context size": "low"}
    raw = decode_request("chat-completions", chat(tools=[tool]))
    assert raw.tools is not None
    assert tools_tokens(raw.tools, words) == 12 + words(json.dumps(tool))


# -- images ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1024, 1024, 4),  # OpenAI's example: 765 tokens = 85 + 4 x 170
        (2048, 4096, 6),  # fit 1024x2048, short side 768 -> 768x1536 -> 2 x 3
        (512, 512, 1),  # small images are never scaled up
        (4096, 8192, 6),
        (2048, 768, 8),  # the most tiles the rule allows
        (100, 3000, 4),  # fit 68x2048; the short side is under 768 and stays: 1 x 4
    ],
)
def test_tiles(width: int, height: int, expected: int) -> None:
    assert tiles(width, height) == expected


@pytest.mark.parametrize(
    ("url", "size"),
    [
        (png(1024, 768), (1024, 768)),
        (gif(320, 200), (320, 200)),
        (jpeg(1920, 1080), (1920, 1080)),
        (webp_vp8x(800, 600), (800, 600)),
        ("https://example.com/cat.png", None),
        ("data:image/png;base64,not-base64!!", None),
        ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), None),
    ],
)
def test_image_size_from_data_url_headers(url: str, size: tuple[int, int] | None) -> None:
    assert image_size(url) == size


@pytest.mark.parametrize(
    ("url", "detail", "model", "expected"),
    [
        (png(1024, 1024), "high", "gpt-4o", 85 + 4 * 170),
        (png(1024, 1024), "low", "gpt-4o", 85),
        (png(1024, 1024), None, "gpt-4o", 85 + 4 * 170),  # auto may choose high: reserve it
        (png(512, 512), "auto", "gpt-4o", 85 + 170),
        (
            "https://example.com/unknown.png",
            "high",
            "gpt-4o",
            85 + 8 * 170,
        ),  # size unknown: the most
        ("https://example.com/unknown.png", "low", "gpt-4o", 85),
        (png(1024, 1024), "high", "gpt-4o-mini-2024-07-18", 2833 + 4 * 5667),
        (png(1024, 1024), "low", "o3-mini", 75),
    ],
)
def test_image_tokens_by_detail_size_and_model(
    url: str, detail: str | None, model: str, expected: int
) -> None:
    assert image_tokens(url, detail, model) == expected


def test_images_in_chat_use_the_request_model() -> None:
    part = {"type": "image_url", "image_url": {"url": png(1024, 1024), "detail": "high"}}
    body = chat(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, part]}],
    )
    assert estimate("chat-completions", body) == 3 + 1 + 3 + (2833 + 4 * 5667) + 3


# -- other operations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "body", "expected"),
    [
        ("completions", {"model": "m", "prompt": "one two three"}, 3),
        ("completions", {"model": "m", "prompt": ["a b", "c"]}, 3),
        ("completions", {"model": "m", "prompt": [1, 2, 3, 4]}, 4),  # pre-tokenized
        ("completions", {"model": "m", "prompt": [[1, 2], [3]]}, 3),
        ("embeddings", {"model": "m", "input": "a b c d"}, 4),
        ("embeddings", {"model": "m", "input": ["a b", "c d e"]}, 5),
        ("embeddings", {"model": "m", "input": [[5, 6, 7]]}, 3),
        (
            "responses",
            {"model": "m", "input": "tell me a joke"},
            REPLY_PRIMING + PER_MESSAGE + 1 + 4,
        ),
        (
            "responses",
            {"model": "m", "instructions": "be kind", "input": "hi"},
            3 + (3 + 1 + 2) + (3 + 1 + 1),
        ),
        (
            "responses",
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "a b"}]},
                    {"type": "function_call_output", "call_id": "x", "output": "42 degrees"},
                ],
            },
            3 + (3 + 1 + 2) + (3 + 2),
        ),
    ],
)
def test_other_operations(operation: str, body: dict[str, object], expected: int) -> None:
    assert estimate(operation, body) == expected


@pytest.mark.parametrize(
    ("operation", "body", "expected"),
    [
        ("chat-completions", {"max_tokens": 100}, 100),
        ("chat-completions", {"max_completion_tokens": 50, "max_tokens": 100}, 50),
        ("chat-completions", {"max_tokens": 100, "n": 3}, 300),
        ("chat-completions", {}, 0),
        ("completions", {"prompt": "x", "max_tokens": 16, "n": 2}, 32),
        ("responses", {"input": "x", "max_output_tokens": 64}, 64),
        ("embeddings", {"input": "x"}, 0),
    ],
)
def test_completion_reserve(operation: str, body: dict[str, object], expected: int) -> None:
    base: dict[str, object] = {"model": "m"}
    if operation == "chat-completions":
        base["messages"] = [{"role": "user", "content": "x"}]
    view = decode_request(operation, json.dumps({**base, **body}).encode())
    assert completion_reserve(view, max_tokens_of(view)) == expected


# -- streamed completions ----------------------------------------------------------------


def delta(**fields: object) -> bytes:
    return json.dumps(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields}]}
    ).encode()


def test_counter_reads_every_kind_of_delta() -> None:
    counter = CompletionCounter(len)  # characters: the sum does not depend on how pieces join
    for data in (
        delta(role="assistant", content=""),
        delta(content="Hello"),
        delta(content=" big world"),
        delta(reasoning_content="think hard"),
        delta(reasoning="more thought"),
        delta(refusal="no way"),
        delta(tool_calls=[{"index": 0, "function": {"name": "lookup", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": "{city: Paris}"}}]),
        delta(tool_calls=[{"index": 0, "function": {"name": None, "arguments": None}}]),
        json.dumps({"choices": [{"index": 0, "text": "completion text"}]}).encode(),
        json.dumps({"type": "response.output_text.delta", "delta": "from responses"}).encode(),
        json.dumps(
            {"type": "response.function_call_arguments.delta", "delta": "args here"}
        ).encode(),
        json.dumps(
            {"type": "response.completed", "response": {"output_text": "not counted twice"}}
        ).encode(),
        json.dumps({"choices": [], "usage": {"completion_tokens": 99}}).encode(),
        b"not json",
        b"[DONE]",
    ):
        counter.feed(data)
    counted = ["Hello", " big world", "think hard", "more thought", "no way", "lookup",
               "{city: Paris}", "completion text", "from responses", "args here"]  # fmt: skip
    assert counter.tokens() == len("".join(counted))


def test_counter_totals_accumulate_across_calls() -> None:
    counter = CompletionCounter(words)
    counter.feed(delta(content="a b"))
    assert counter.tokens() == 2
    assert counter.tokens() == 2  # nothing new
    counter.feed(delta(content=" c"))
    assert counter.tokens() == 3
