"""Incremental Server-Sent Events framing on bytes: pure, no I/O, any chunk boundary works.

`EventSplitter.feed(chunk)` returns the whole events completed by `chunk`, each as the
original bytes including its terminating blank line, so a relay can forward them untouched;
`flush()` returns what is left when the stream ends. `parse_event` reads the `event:` and
`data:` fields of one event. Line endings may be LF, CRLF or CR (WHATWG HTML §9.2.6); events
are normalised to LF only when the stream uses CR.
"""

from __future__ import annotations

_LF2 = b"\n\n"


class EventSplitter:
    """Splits an SSE byte stream into whole events."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add `chunk`; return the events it completes (possibly none)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer, held = _normalise_newlines(buffer)
        else:
            held = b""
        end = buffer.rfind(_LF2)
        if end < 0:
            self._buffer = buffer + held
            return []
        end += 2
        self._buffer = buffer[end:] + held
        complete = buffer[:end]
        if complete.count(_LF2) == 1 and complete.endswith(_LF2):
            return [complete]
        return [part + _LF2 for part in complete[:-2].split(_LF2)]

    def flush(self) -> bytes:
        """Return (and forget) the bytes of an unterminated last event."""
        rest, self._buffer = self._buffer, b""
        if b"\r" in rest:  # a CR held back at the very end can no longer start a CRLF
            rest = rest.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return rest


def _normalise_newlines(buffer: bytes) -> tuple[bytes, bytes]:
    # A CR at the very end may be the first half of a CRLF split across chunks: hold it back.
    held = b""
    if buffer.endswith(b"\r"):
        buffer, held = buffer[:-1], b"\r"
    return buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), held


def parse_event(event: bytes) -> tuple[bytes, bytes]:
    """Return `(event_name, data)` of one event; data lines are joined with LF.

    Comments and unknown fields are ignored; a missing `event:` gives `b""`.
    """
    name = b""
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if not line or line[0] == 0x3A:  # blank or ':' comment
            continue
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return name, b"\n".join(data)


def encode_event(data: bytes, event: bytes = b"") -> bytes:
    """Frame one event (`data` must not contain newlines)."""
    if event:
        return b"event: " + event + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"
