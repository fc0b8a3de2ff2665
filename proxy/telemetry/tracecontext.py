"""W3C Trace Context (https://www.w3.org/TR/trace-context/): read a client's `traceparent`,
write the one the backend receives, and decide sampling the way the OTel SDK's standard
samplers do (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`). Pure; no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import NamedTuple

SAMPLED = 0x01
_HEX = frozenset(b"0123456789abcdef")


class Parent(NamedTuple):
    """The caller's span, from its `traceparent` header."""

    trace_id: int
    span_id: int
    flags: int


def parse_traceparent(value: bytes) -> Parent | None:
    """`00-<32 hex>-<16 hex>-<2 hex>` (any version but ff, longer future versions too), or
    None when malformed, all-zero ids or version ff: the caller then starts a new trace."""
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if version == b"ff" or not _is_hex(version) or (version == b"00" and len(value) != 55):
        return None
    if len(value) > 55 and value[55:56] != b"-":
        return None
    trace, span, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace) and _is_hex(span) and _is_hex(flags)):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return Parent(trace_id, span_id, int(flags, 16))


def _is_hex(value: bytes) -> bool:
    return _HEX.issuperset(value)


def traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags & 0xFF)


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


def new_span_id() -> int:
    return random.getrandbits(64) or 1


class Sampler:
    """The OTel SDK's standard samplers: always_on, always_off, traceidratio, and their
    parentbased_ forms (a sampled parent is followed; a root is decided by the inner one)."""

    __slots__ = ("_bound", "_parent_based", "name")

    def __init__(self, name: str = "parentbased_always_on", arg: str = "") -> None:
        self.name = name
        self._parent_based = name.startswith("parentbased_")
        inner = name.removeprefix("parentbased_")
        if inner == "always_on":
            ratio = 1.0
        elif inner == "always_off":
            ratio = 0.0
        elif inner == "traceidratio":
            try:
                ratio = float(arg) if arg else 1.0
            except ValueError:
                raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: not a ratio: {arg!r}") from None
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {ratio} is not within 0..1")
        else:
            raise ValueError(f"OTEL_TRACES_SAMPLER: unsupported sampler {name!r}")
        # As the SDK's TraceIdRatioBased: the lower 64 bits of the trace id against a bound.
        self._bound = round(ratio * (1 << 64))

    def sampled(self, trace_id: int, parent: Parent | None) -> bool:
        if parent is not None and self._parent_based:
            return bool(parent.flags & SAMPLED)
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self._bound

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Sampler:
        name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        return cls(name, environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip())
