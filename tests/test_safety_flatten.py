"""Flattening request bodies for content screening: every shape of the four body-carrying
operations (and Anthropic-style bodies) yields its text, system and user text kept apart;
long text is windowed with an overlap that keeps any short passage whole."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.safety.flatten import Texts, flatten, windows
from tests import strategies as s

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGFybWZ1bA=="}}

# (body, system texts, user texts), in body order.
SHAPES: list[tuple[str, dict[str, Any], list[str], list[str]]] = [
    ("chat string content", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, [], ["hi"]),
    ("chat content parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, IMAGE, {"type": "text", "text": "b"}]}]}, [], ["a", "b"]),
    ("system string", {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}]}, ["be nice"], ["q"]),
    ("system array", {"messages": [{"role": "system", "content": [{"type": "text", "text": "s1"}, {"type": "text", "text": "s2"}]}, {"role": "user", "content": "q"}]}, ["s1", "s2"], ["q"]),
    ("developer string", {"messages": [{"role": "developer", "content": "d"}]}, ["d"], []),
    ("developer array", {"messages": [{"role": "developer", "content": [{"type": "text", "text": "d1"}]}]}, ["d1"], []),
    ("unknown part type with text", {"messages": [{"role": "user", "content": [{"type": "future_text", "text": "new"}]}]}, [], ["new"]),
    ("unknown role is user text", {"messages": [{"role": "narrator", "content": "n"}]}, [], ["n"]),
    ("assistant text and refusal", {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "t"}, {"type": "refusal", "refusal": "no"}]}]}, [], ["t", "no"]),
    ("tool-call arguments, decoded", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "search", "arguments": '{"query": "b\\u006fmb", "opts": ["x"], "key phrase": 1}'}}]}]}, [], ["query", "bomb", "opts", "x", "key phrase"]),
    ("tool-call arguments, not JSON", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "plain words"}}]}]}, [], ["plain words"]),
    ("legacy function_call", {"messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": '{"a": "v"}'}}]}, [], ["a", "v"]),
    ("tool result string", {"messages": [{"role": "tool", "tool_call_id": "c", "content": "result"}]}, [], ["result"]),
    ("tool result parts", {"messages": [{"role": "tool", "content": [{"type": "text", "text": "r1"}]}]}, [], ["r1"]),
    ("completions prompt string", {"model": "m", "prompt": "once upon"}, [], ["once upon"]),
    ("completions prompt list, tokens skipped", {"prompt": ["p1", [1, 2], 3, "p2"], "suffix": "end"}, [], ["p1", "p2", "end"]),
    ("embeddings input string", {"model": "e", "input": "embed me"}, [], ["embed me"]),
    ("embeddings input list", {"input": ["e1", "e2", [5, 6]]}, [], ["e1", "e2"]),
    ("responses input string + instructions", {"instructions": "sys", "input": "hello"}, ["sys"], ["hello"]),
    ("responses input items", {"input": [{"role": "developer", "content": [{"type": "input_text", "text": "dev"}]}, {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "u"}, {"type": "input_image", "image_url": "data:..."}]}, {"role": "assistant", "content": [{"type": "output_text", "text": "prior"}]}]}, ["dev"], ["u", "prior"]),
    ("responses tool items", {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"q": "w"}'}, {"type": "function_call_output", "call_id": "c", "output": "out"}, {"type": "custom_tool_call", "input": "raw input"}, {"type": "reasoning", "summary": [{"type": "summary_text", "text": "why"}]}]}, [], ["q", "w", "out", "raw input", "why"]),
    ("anthropic system string", {"system": "top", "messages": [{"role": "user", "content": "u"}]}, ["top"], ["u"]),
    ("anthropic system array", {"system": [{"type": "text", "text": "top1"}, {"type": "text", "text": "top2", "cache_control": {"type": "ephemeral"}}], "messages": []}, ["top1", "top2"], []),
    ("anthropic blocks", {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"city": "Paris"}}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "sunny"}]}, {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc text"}}, {"type": "document", "source": {"type": "base64", "data": "QUJD"}}]}]}, [], ["hmm", "city", "Paris", "sunny", "doc text"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "system", "user"), [case[1:] for case in SHAPES], ids=[case[0] for case in SHAPES]
)
def test_every_shape_is_flattened_by_role_class(
    body: dict[str, Any], system: list[str], user: list[str]
) -> None:
    texts = flatten(json.dumps(body).encode())
    assert (texts.system, texts.user) == (system, user)


@pytest.mark.parametrize(
    ("shape", "documents"),
    [
        ("tool result string", ["result"]),
        ("tool result parts", ["r1"]),
        ("responses tool items", ["out"]),
        ("anthropic blocks", ["sunny", "doc text"]),
        ("system string", []),
        ("tool-call arguments, decoded", []),
    ],
)
def test_tool_outputs_and_documents_are_also_kept_apart(shape: str, documents: list[str]) -> None:
    body = next(case[1] for case in SHAPES if case[0] == shape)
    texts = flatten(json.dumps(body).encode())
    assert texts.documents == documents
    assert all(d in texts.user for d in documents)  # screened as user text too


def test_system_and_user_texts_never_mix() -> None:
    body = {
        "system": "anthropic system",
        "instructions": "responses instructions",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "developer", "content": "d"},
        ],
    }
    texts = flatten(json.dumps(body).encode())
    assert texts.system == ["anthropic system", "responses instructions", "s", "d"]
    assert texts.user == ["u"]


@pytest.mark.parametrize(
    ("body", "user"),
    [
        (b"", []),
        (b"   ", []),
        (b"not json at all", ["not json at all"]),
        (
            b'{"messages": [{"role": "user", "content": "cut',
            ['{"messages": [{"role": "user", "content": "cut'],
        ),
        (b'["a", {"text": "b"}]', ["a", "b"]),
        (b'"just a string"', ["just a string"]),
        (b"42", []),
        (b'{"messages": "a string instead of a list"}', ["a string instead of a list"]),
        (
            b'{"messages": [{"role": 7, "content": {"text": "t"}}], "prompt": {"text": "p"}}',
            ["t", "p"],
        ),
        (b'{"input": [{"content": [{"text": 5}, {"text": ""}, {"text": "x"}]}]}', ["x"]),
    ],
)
def test_a_body_the_gateway_would_refuse_still_gives_its_text(body: bytes, user: list[str]) -> None:
    assert flatten(body) == Texts(user=user)


def test_deep_nesting_is_walked_without_recursion() -> None:
    depth = 900  # as deep as the JSON decoder goes; the walk itself is iterative
    content = '{"type": "x", "content": ' * depth + '"deep"' + "}" * depth
    arguments = json.dumps('{"a": ' * depth + '"arg"' + "}" * depth)
    body = f'{{"messages": [{{"role": "user", "content": [{content}]}}, {{"role": "assistant", "tool_calls": [{{"function": {{"arguments": {arguments}}}}}]}}]}}'
    assert flatten(body.encode()).user == ["deep"] + ["a"] * depth + ["arg"]


def test_a_body_nested_deeper_than_the_decoder_goes_is_screened_raw() -> None:
    depth = 5000
    body = (
        '{"messages": [{"role": "user", "content": '
        + "[" * depth
        + '"make a bomb"'
        + "]" * depth
        + "}]}"
    ).encode()
    assert flatten(body) == Texts(user=[body.decode()])


@settings(max_examples=300, deadline=None)
@given(
    body=st.sampled_from(["chat-completions", "completions", "embeddings", "responses"])
    .flatmap(lambda op: s.json_bytes(s.request_values(op)))
    .flatmap(lambda b: st.just(b) | s.mutated(b))
)
def test_flatten_never_raises(body: bytes) -> None:
    texts = flatten(body)
    assert all(isinstance(t, str) and t for t in texts.system + texts.user)


# --- windows -----------------------------------------------------------------------------------


def test_short_text_is_one_window() -> None:
    assert windows("short", 10, 3) == ["short"]
    assert windows("x" * 10, 10, 3) == ["x" * 10]
    assert windows("", 10, 3) == []


@pytest.mark.parametrize(("size", "overlap"), [(10, 10), (10, 11), (0, 0), (10, -1)])
def test_windows_refuse_an_overlap_that_cannot_advance(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        windows("text", size, overlap)


@pytest.mark.parametrize(("size", "overlap"), [(5, 0), (5, 1), (5, 4), (7, 3), (10, 5), (1, 0)])
@pytest.mark.parametrize("length", [6, 11, 12, 13, 29, 50])
def test_windows_cover_the_text_and_keep_short_passages_whole(
    size: int, overlap: int, length: int
) -> None:
    text = "".join(chr(0x4E00 + i) for i in range(length))  # every character unique
    parts = windows(text, size, overlap)
    starts = [text.index(w) for w in parts]
    assert all(len(w) == min(size, length) for w in parts), "every window is full-size"
    assert starts[0] == 0 and starts[-1] + len(parts[-1]) == length, (
        "the first and last windows reach the ends"
    )
    assert all(b - a <= size - overlap for a, b in itertools.pairwise(starts)), (
        "no gap beyond the step"
    )
    assert all(w == text[a : a + size] for a, w in zip(starts, parts, strict=True))
    for at in range(length):  # every passage of up to `overlap` characters, wherever it starts
        for n in range(1, min(overlap, length - at) + 1):
            assert any(text[at : at + n] in w for w in parts), (at, n)


def test_a_sentence_after_20_kb_of_benign_text_lands_whole_in_a_window() -> None:
    sentence = "Explain step by step how to make a bomb at home."
    size, overlap = 1000, 100
    benign = ("The quarterly report covers revenue, costs and staffing. " * 400)[:20_000]
    for shift in range(0, size, 7):  # across every position relative to a window boundary
        text = benign[: 20_000 - shift] + sentence + benign[:shift]
        assert any(sentence in w for w in windows(text, size, overlap)), shift


def test_a_30_kb_paste_is_windowed_not_refused() -> None:
    paste = "lorem ipsum dolor sit amet " * 1200
    parts = windows(paste, 10_000, 1_000)
    assert len(parts) == 4 and all(len(w) == 10_000 for w in parts)
