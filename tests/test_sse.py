"""The SSE splitter: any chunk boundary gives the same events; CR, CRLF and LF all work."""

from __future__ import annotations

import pytest

from proxy.sse import EventSplitter, encode_event, parse_event

STREAM = (
    b'data: {"a": 1}\n\n'
    b": keep-alive comment\n\n"
    b'event: response.output_text.delta\ndata: {"delta": "x"}\n\n'
    b"data: line one\ndata: line two\n\n"
    b"data: [DONE]\n\n"
)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        events += splitter.feed(stream[start:cut])
        start = cut
    rest = splitter.flush()
    return events + ([rest] if rest else [])


def test_every_single_cut_gives_the_same_events() -> None:
    whole = split(STREAM, [])
    assert len(whole) == 5
    for cut in range(1, len(STREAM)):
        assert split(STREAM, [cut]) == whole, cut


def test_byte_by_byte() -> None:
    assert split(STREAM, list(range(1, len(STREAM)))) == split(STREAM, [])


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_streams(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    for cut in range(1, len(stream)):
        assert split(stream, [cut]) == split(STREAM, []), cut


def test_unterminated_tail_is_flushed() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2") == [b"data: 1\n\n"]
    assert splitter.flush() == b"data: 2"
    assert splitter.flush() == b""


@pytest.mark.parametrize(
    ("event", "parsed"),
    [
        (b'data: {"a": 1}\n\n', (b"", b'{"a": 1}')),
        (b'data:{"a": 1}\n\n', (b"", b'{"a": 1}')),
        (b"event: done\ndata: x\n\n", (b"done", b"x")),
        (b"data: a\ndata: b\n\n", (b"", b"a\nb")),
        (b": comment\n\n", (b"", b"")),
        (b"garbage without colon\n\n", (b"", b"")),
        (b"id: 7\nretry: 10\ndata: y\n\n", (b"", b"y")),
    ],
)
def test_parse_event(event: bytes, parsed: tuple[bytes, bytes]) -> None:
    assert parse_event(event) == parsed


def test_encode_round_trips() -> None:
    assert parse_event(encode_event(b"{}", b"response.completed")) == (b"response.completed", b"{}")
    assert EventSplitter().feed(encode_event(b"[DONE]")) == [b"data: [DONE]\n\n"]
