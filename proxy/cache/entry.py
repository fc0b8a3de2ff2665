"""A cached reply as the index keeps it: the bytes of a whole reply, or the events of a stream
as the backend framed them (replayed one by one, so a hit streams with the original chunking).

The gateway always asks a streamed chat/completions for usage, so a stored stream holds the
usage-only chunk; `usage_at` marks it, and a replay leaves it out for a client that did not
ask for it (as the live relay does, proxy/relay.py `ChatStreamFilter`). A Responses API stream
has no such chunk (usage comes with `response.completed`). Entries are msgpack arrays; one
that does not decode (another version's, a corrupt one) is a miss.

What makes a reply complete, and so worth storing: a chat/completions stream reached
`data: [DONE]`; a Responses stream, which has no `[DONE]`, reached `response.completed`
(`response.incomplete` and `response.failed` end it too, short of an answer); a whole
Responses reply says `"status": "completed"`.
"""

from __future__ import annotations

import time

import msgspec

from proxy.schemas import JSON_ERRORS, read_chunk
from proxy.sse import parse_event

_DONE = b"[DONE]"
_COMPLETED = b"response.completed"


class Entry(msgspec.Struct, array_like=True, frozen=True):
    body: bytes = b""  # a whole reply
    events: tuple[bytes, ...] = ()  # or a stream's events
    usage_at: int = -1  # the usage-only chunk among `events`, -1 when none
    content_type: str = "application/json"
    model: str = ""
    finish_reasons: tuple[str, ...] = ()
    created: float = 0.0  # unix time it was stored

    @property
    def streamed(self) -> bool:
        return bool(self.events)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def encode(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode(payload: bytes) -> Entry | None:
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def whole(body: bytes, content_type: str, model: str, finish_reasons: tuple[str, ...]) -> Entry:
    return Entry(body=body, content_type=content_type, model=model,
                 finish_reasons=finish_reasons, created=time.time())  # fmt: skip


def stream(events: list[bytes], model: str, finish_reasons: tuple[str, ...]) -> Entry:
    """An entry for a complete stream's events (the usage-only chunk found and marked)."""
    usage_at = -1
    for i in range(len(events) - 1, -1, -1):
        _, data = parse_event(events[i])
        if not data or data == _DONE:
            continue
        chunk = read_chunk(data)
        if chunk is not None and chunk[1]:  # usage only
            usage_at = i
            break
    return Entry(events=tuple(events), usage_at=usage_at, content_type="text/event-stream",
                 model=model, finish_reasons=finish_reasons, created=time.time())  # fmt: skip


def completes(event: bytes) -> bool:
    """Is this the event that ends a chat/completions stream (`data: [DONE]`)?"""
    return _DONE in event and parse_event(event)[1] == _DONE


class _Outcome(msgspec.Struct):
    type: str = ""  # a Responses stream event's
    status: str = ""  # a whole Responses reply's


_outcome_decoder = msgspec.json.Decoder(_Outcome)


def completes_response(event: bytes) -> bool:
    """Is this the event that ends a complete Responses stream (`response.completed`)? The
    event's own `type` decides: a text delta may well say "response.completed"."""
    return _COMPLETED in event and _outcome(parse_event(event)[1]).type == "response.completed"


def is_complete_response(body: bytes) -> bool:
    """Is this whole Responses reply complete (not `incomplete`, `failed`, `queued`, ...)?"""
    return _outcome(body).status == "completed"


def _outcome(data: bytes) -> _Outcome:
    try:
        return _outcome_decoder.decode(data)
    except JSON_ERRORS:  # ValidationError is a DecodeError
        return _Outcome()
