"""A minimal protobuf wire-format writer: just what `proxy.telemetry.otlp` needs.

Every function returns the bytes of one whole field (tag included), so a message is the
concatenation of its fields in any order (protobuf parsers accept fields out of order, and
proto3 writers may omit fields at their default). Nothing here knows a schema; field numbers
belong to the caller. Pure, stdlib only.

Wire format: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

VARINT = 0
I64 = 1  # fixed64, sfixed64, double
LEN = 2  # string, bytes, sub-message, packed repeated
I32 = 5  # fixed32, sfixed32, float

_MASK64 = (1 << 64) - 1
# One-byte varints (0..127): most lengths and enum values, without building a bytearray.
SMALL: tuple[bytes, ...] = tuple(bytes((i,)) for i in range(128))

_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_SFIXED64 = struct.Struct("<q")
_FIXED32 = struct.Struct("<I")
# Packers for packed repeated fields, by element count (histograms reuse a few lengths).
_PACKED: dict[str, struct.Struct] = {}


def varint(n: int) -> bytes:
    """Base-128 varint of `n`; a negative int64 is taken two's complement (10 bytes)."""
    if 0 <= n < 0x80:
        return SMALL[n]
    n &= _MASK64
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    """The key that starts a field: (field number << 3) | wire type, as a varint."""
    return varint(field << 3 | wire_type)


def length_delimited(field: int, data: bytes) -> bytes:
    """A string, bytes or sub-message field."""
    n = len(data)
    return tag(field, LEN) + (SMALL[n] if n < 0x80 else varint(n)) + data


def string(field: int, text: str) -> bytes:
    return length_delimited(field, text.encode())


def uint(field: int, n: int) -> bytes:
    """A varint field: int32/int64/uint64/bool/enum (negative ints become 10 bytes)."""
    return tag(field, VARINT) + varint(n)


def fixed64(field: int, n: int) -> bytes:
    return tag(field, I64) + _FIXED64.pack(n)


def sfixed64(field: int, n: int) -> bytes:
    return tag(field, I64) + _SFIXED64.pack(n)


def double(field: int, x: float) -> bytes:
    return tag(field, I64) + _DOUBLE.pack(x)


def fixed32(field: int, n: int) -> bytes:
    return tag(field, I32) + _FIXED32.pack(n)


def packed_fixed64(field: int, values: Sequence[int]) -> bytes:
    """A packed repeated fixed64 field; an empty sequence is omitted (b"")."""
    return _packed(field, "Q", values) if values else b""


def packed_double(field: int, values: Sequence[float]) -> bytes:
    """A packed repeated double field; an empty sequence is omitted (b"")."""
    return _packed(field, "d", values) if values else b""


def _packed(field: int, code: str, values: Sequence[float]) -> bytes:
    fmt = f"<{len(values)}{code}"
    packer = _PACKED.get(fmt)
    if packer is None:
        if len(_PACKED) >= 256:  # bounded: odd lengths must not grow it forever
            _PACKED.clear()
        packer = _PACKED[fmt] = struct.Struct(fmt)
    return length_delimited(field, packer.pack(*values))
