"""Request views and usage reading."""

from __future__ import annotations

import json

import pytest

from proxy.errors import InvalidRequestError
from proxy.schemas import (
    Usage,
    decode_request,
    read_chunk,
    read_reply,
    read_response_event,
    with_stream_usage,
)


def test_views_ignore_unknown_fields_and_read_what_matters() -> None:
    view = decode_request("chat-completions", json.dumps({
        "model": "gpt-4o", "stream": True, "max_completion_tokens": 9, "new_param": {"x": 1},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                     {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}]}],
    }).encode())  # fmt: skip
    assert view.model == "gpt-4o" and view.stream and view.max_completion_tokens == 9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": {"x": 1}}]}',
         "$.messages[0].content: expected str, array or null, got object"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "$.messages[0]: object missing required field role"),
    ],
)  # fmt: skip
def test_errors_name_the_json_path(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_request("chat-completions", body)
    assert info.value.message == message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "stream": true}',
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": false}}',
        b'{"model": "m", "stream": true, "stream_options": {"continuous_usage_stats": true}}',
        b'{"model": "m", "stream": true, "stream_options": null}',
    ],
)
def test_with_stream_usage_sets_only_that_flag(body: bytes) -> None:
    before = json.loads(body)
    after = json.loads(with_stream_usage(body))
    assert after["stream_options"]["include_usage"] is True
    for key, value in (before.get("stream_options") or {}).items():
        if key != "include_usage":
            assert after["stream_options"][key] == value
    assert {k: v for k, v in after.items() if k != "stream_options"} == {
        k: v for k, v in before.items() if k != "stream_options"
    }


def usage_of(body: bytes) -> Usage | None:
    reply = read_reply(body)
    return reply[0] if reply is not None else None


def test_usage_shapes() -> None:
    chat = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 1}}}'
    assert usage_of(chat) == Usage(3, 4, 7, 2, 1)
    responses = b'{"usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}}'
    assert usage_of(responses) == Usage(5, 6, 11)
    embeddings = b'{"usage": {"prompt_tokens": 8, "total_tokens": 8}}'
    assert usage_of(embeddings) == Usage(8, 0, 8)
    assert read_reply(b"not json") is None
    assert usage_of(b'{"id": "x"}') is None


def test_reply_model_and_finish_reasons() -> None:
    body = (
        b'{"model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "finish_reason": "stop", '
        b'"message": {"content": "hi"}}, {"index": 1, "finish_reason": "length"}], '
        b'"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    )
    assert read_reply(body) == (Usage(1, 2, 3), "gpt-4o-2024-08-06", ("stop", "length"))
    assert read_reply(b'{"object": "list", "data": []}') == (None, "", ())


def test_stream_chunks() -> None:
    assert read_chunk(
        b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    ) == (Usage(1, 2, 3), True, "", ())
    assert read_chunk(b'{"choices": [{"delta": {}}], "usage": null}') == (None, False, "", ())
    assert read_chunk(b'{"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}') == (
        Usage(1, 0, 1),
        False,
        "",
        (),
    )
    last = b'{"model": "m-1", "choices": [{"delta": {}, "finish_reason": "tool_calls"}]}'
    assert read_chunk(last) == (None, False, "m-1", ("tool_calls",))
    assert read_chunk(b"{broken") is None
    completed = b'{"type": "response.completed", "response": {"id": "r", "model": "m-2", "usage": {"input_tokens": 2, "output_tokens": 3}}}'
    assert read_response_event(completed) == ("response.completed", (Usage(2, 3, 5), "m-2", ()))
    assert read_response_event(b'{"type": "response.output_text.delta", "delta": "x"}') == (
        "response.output_text.delta",
        None,
    )
