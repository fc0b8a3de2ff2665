"""OTLP protobuf bodies for spans and metrics, as POSTed to an OTLP/HTTP collector
(`/v1/traces`, `/v1/metrics`, Content-Type `application/x-protobuf`).

Why not `opentelemetry-proto`'s generated classes: filling and serializing their messages
costs 11-17 µs per span here, several times the per-request telemetry budget (issue 5).
Here a span is ~3-5 µs: its fixed-size fields go out in two `struct` packs, the attributes
many spans share (`SpanRecord.constant`) are encoded once per distinct tuple, each attribute
key is encoded once (with a ready head per value type), and str-valued attributes are
remembered whole. Field numbers come from opentelemetry-proto v1 (`trace.proto`,
`metrics.proto`, `common.proto`, `resource.proto`); tests/test_otlp.py decodes every body
with the official classes.

Attribute values: str, bool, int (int64; larger ints go out as their decimal string), float,
bytes, and tuples/lists of those (array_value). None, and any other type, drops the attribute,
as the OpenTelemetry SDK drops invalid attribute values.

Nothing to send (no spans, or no instrument with a series) encodes as b"", an empty export
request, so the exporter can skip the POST.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from proxy.telemetry import protobuf as pb
from proxy.telemetry.metrics import (
    OVERFLOW,
    OVERFLOW_ATTRIBUTE,
    Counter,
    Gauge,
    Histogram,
    HistogramPoint,
    Instrument,
    Registry,
)

Attributes = tuple[tuple[str, object], ...]

SPAN_KIND_CLIENT = 3


class SpanRecord(NamedTuple):
    """One finished span, as the request path records it (ids are ints, times unix ns)."""

    trace_id: int  # 128 bits
    span_id: int  # 64 bits
    parent_id: int  # 0 = a root span
    name: str
    kind: int  # OTLP SpanKind, 0..5
    start_ns: int
    end_ns: int
    # Attributes many spans share (route, model, backend): encoded once per distinct tuple.
    # Reusing the same tuple object makes the lookup cheapest.
    constant: Attributes
    attributes: Attributes
    events: tuple[tuple[str, int, Attributes], ...]  # (name, time_ns, attributes)
    error: str  # "" = status UNSET; else status ERROR with this message
    flags: int  # Span.flags as sent: W3C trace flags | the has/is-remote bits


_SMALL = pb.SMALL
_varint = pb.varint
_MASK64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_END = 1 << 63
_CACHE_SIZE = 1024  # entries per cache; cleared when full (the sets in use refill it at once)

# Tags (field << 3 | wire type) as bytes, named Message_field.
_KEYVALUE_VALUE = b"\x12"
_ANY_STRING = b"\x0a"
_ANY_BOOL = b"\x10"
_ANY_BOOL_TRUE, _ANY_BOOL_FALSE = b"\x10\x01", b"\x10\x00"
_ANY_INT = b"\x18"
_ANY_DOUBLE = b"\x21"
_ANY_ARRAY = b"\x2a"
_ANY_BYTES = b"\x3a"
_ARRAY_VALUES = b"\x0a"
_RESOURCE_ATTRIBUTES = b"\x0a"
_SCOPE_NAME, _SCOPE_VERSION = 1, 2
_SPAN_NAME = b"\x2a"
_SPAN_ATTRIBUTES = b"\x4a"
_SPAN_EVENTS = b"\x5a"
_SPAN_STATUS = b"\x7a"
_STATUS_ERROR = b"\x18\x02"  # code = STATUS_CODE_ERROR (2)
_STATUS_MESSAGE = b"\x12"
_EVENT_TIME = 0x09  # fixed64
_EVENT_NAME = b"\x12"
_EVENT_ATTRIBUTES = b"\x1a"
_METRIC_NAME, _METRIC_DESCRIPTION, _METRIC_UNIT = 1, 2, 3
_METRIC_GAUGE, _METRIC_SUM, _METRIC_HISTOGRAM = 5, 7, 9
_DATA_POINTS = 1  # Gauge, Sum and Histogram all hold their points in field 1
_CUMULATIVE = b"\x10\x02"  # aggregation_temporality = CUMULATIVE
_MONOTONIC = b"\x18\x01"  # Sum.is_monotonic = true
_NUMBER_ATTRIBUTES = b"\x3a"
_HISTOGRAM_ATTRIBUTES = b"\x4a"
_HISTOGRAM_BUCKETS, _HISTOGRAM_BOUNDS = 6, 7

# A span's fixed-size fields in two packs (ids are big-endian, the rest little-endian), each
# value after its tag: trace_id (1, 16 bytes, as two halves), span_id (2), parent_span_id
# (4) when there is one; kind (6), start and end (7, 8: fixed64), flags (16: fixed32).
_IDS = struct.Struct(">2sQQ2sQ")
_IDS_PARENT = struct.Struct(">2sQQ2sQ2sQ")
_TRACE, _SPAN, _PARENT = b"\x0a\x10", b"\x12\x08", b"\x22\x08"  # with their lengths
_TIMES_FLAGS = struct.Struct("<BBBQBQ2sI")
_KIND, _START, _END, _FLAGS = 0x30, 0x39, 0x41, b"\x85\x01"
_FIXED64 = struct.Struct("<BQ")
_DOUBLE = struct.Struct("<d")
_SFIXED64 = struct.Struct("<q")
_INT14 = struct.Struct("<H")  # a two-byte varint, packed as one little-endian int
# Data point fields 2-3 (start_time_unix_nano, time_unix_nano: fixed64).
_POINT_TIMES = struct.Struct("<BQBQ")
_POINT_START, _POINT_TIME = 0x11, 0x19
_AS_DOUBLE, _AS_INT = b"\x21", b"\x31"
# HistogramDataPoint count (4, fixed64) and sum (5, double); min (11) and max (12, double).
_COUNT_SUM = struct.Struct("<BQBd")
_MIN_MAX = struct.Struct("<BdBd")

# Memo caches. Encoding runs on one exporter thread; were two threads to share them, a
# clear racing an insert would only cost a re-encode.
_BY_TAG: dict[bytes, _Caches] = {}  # KeyValue field tag -> attribute keys and fields seen
# The shared span attributes -> (the tuple they came from, bytes, where its values are not str)
_CONSTANTS: dict[Attributes, tuple[Attributes, bytes, tuple[int, ...]]] = {}
# (resource, scope name, version) -> (resource, where it is not str, the two fields)
_ENVELOPES: dict[tuple[object, ...], tuple[Attributes, tuple[int, ...], tuple[bytes, bytes]]] = {}
_K = TypeVar("_K")
_V = TypeVar("_V")


def encode_spans(
    records: Sequence[SpanRecord],
    resource: Sequence[tuple[str, object]],
    scope_name: str,
    scope_version: str,
) -> bytes:
    """An ExportTraceServiceRequest: one ResourceSpans, one ScopeSpans, all `records`."""
    spans = [encode_span(r) for r in records]
    return encode_span_request(spans, resource, scope_name, scope_version)


def encode_span(record: SpanRecord) -> bytes:
    """One Span message, to be sent later with others by `encode_span_request`: the request
    path encodes as it finishes, so what waits for export is bytes, which the garbage
    collector does not track (a queued record kept a whole exchange alive into the older
    generations). Not thread-safe: call from one thread (the constant-attribute cache)."""
    return _span(record, _constant(record.constant))


def encode_span_request(
    spans: list[bytes],
    resource: Sequence[tuple[str, object]],
    scope_name: str,
    scope_version: str,
) -> bytes:
    """An ExportTraceServiceRequest of spans made by `encode_span` (b"" when none)."""
    if not spans:
        return b""
    return _envelope(resource, scope_name, scope_version, list(spans))


def encode_metrics(
    registry: Registry,
    resource: Sequence[tuple[str, object]],
    scope_name: str,
    scope_version: str,
    now_ns: int,
    extra: Sequence[Gauge] = (),
) -> bytes:
    """An ExportMetricsServiceRequest of every instrument with a series, cumulative since
    `registry.start_ns`, plus the `extra` gauges read now."""
    times = _POINT_TIMES.pack(_POINT_START, registry.start_ns, _POINT_TIME, now_ns)
    metrics = [_instrument(i, times) for i in registry if i.series]
    metrics += [_gauge(g, now_ns, times) for g in extra if g.points]
    if not metrics:
        return b""
    return _envelope(resource, scope_name, scope_version, metrics)


# --- the envelope: ExportXRequest{ResourceX{resource, ScopeX{scope, items}}} ---------------


def _envelope(
    resource: Sequence[tuple[str, object]], name: str, version: str, items: list[bytes]
) -> bytes:
    """Traces and metrics nest alike: request.1 = ResourceX{resource = 1, scope_x = 2},
    ScopeX{scope = 1, spans/metrics = 2 (repeated)}."""
    resource_field, scope_field = _prefix(tuple(resource), name, version)
    items.insert(0, scope_field)
    scoped = pb.length_delimited(2, b"".join(items))
    return pb.length_delimited(1, resource_field + scoped)


def _prefix(resource: Attributes, name: str, version: str) -> tuple[bytes, bytes]:
    """The Resource and InstrumentationScope fields, cached: they rarely change."""
    try:
        hit = _ENVELOPES.get((resource, name, version))
    except TypeError:  # an unhashable value (a list)
        return _resource_scope(resource, name, version)
    if hit is not None and _same_types(hit[0], resource, hit[1]):
        return hit[2]
    fields = _resource_scope(resource, name, version)
    _remember(_ENVELOPES, (resource, name, version), (resource, _non_str(resource), fields))
    return fields


def _resource_scope(resource: Attributes, name: str, version: str) -> tuple[bytes, bytes]:
    scope = pb.string(_SCOPE_NAME, name) if name else b""
    scope += pb.string(_SCOPE_VERSION, version) if version else b""
    attributes = _attributes(_RESOURCE_ATTRIBUTES, resource)
    return pb.length_delimited(1, attributes), pb.length_delimited(1, scope)


# --- spans -----------------------------------------------------------------------------------


def _span(record: SpanRecord, constant: bytes) -> bytes:
    """ScopeSpans.spans (field 2): one Span message, `constant` its encoded shared attributes.
    One join, not a chain of `+`: each `+` would copy everything before it."""
    trace_id, span_id, parent_id, name, kind, start, end, _, attributes, events, error, flags = (
        record
    )
    trace_hi, trace_lo = trace_id >> 64, trace_id & _MASK64
    if parent_id:
        ids = _IDS_PARENT.pack(_TRACE, trace_hi, trace_lo, _SPAN, span_id, _PARENT, parent_id)
    else:
        ids = _IDS.pack(_TRACE, trace_hi, trace_lo, _SPAN, span_id)
    try:
        name_bytes = name.encode()
    except UnicodeEncodeError:
        name_bytes = _utf8(name)
    n = len(name_bytes)
    parts = [
        ids,
        _TIMES_FLAGS.pack(_KIND, kind, _START, start, _END, end, _FLAGS, flags),
        _SPAN_NAME + (_SMALL[n] if n < 0x80 else _varint(n)),
        name_bytes,
        constant,
    ]
    if attributes:
        parts.append(_attributes(_SPAN_ATTRIBUTES, attributes))
    if events:
        parts += [_event(e) for e in events]
    if error:
        parts.append(_status(error))
    body = b"".join(parts)
    n = len(body)
    return b"\x12" + (_SMALL[n] if n < 0x80 else _varint(n)) + body


def _constant(attributes: Attributes) -> bytes:
    """Span.attributes for the shared tuple, from the cache when an equal tuple was seen with
    the same value types: `==` alone would let 1, 1.0 and True share one encoding."""
    try:
        hit = _CONSTANTS.get(attributes)
    except TypeError:  # an unhashable value (a list): encode it every time
        return _attributes(_SPAN_ATTRIBUTES, attributes)
    if hit is not None:
        seen, encoded, non_str = hit
        if seen is attributes or _same_types(seen, attributes, non_str):
            return encoded
    encoded = _attributes(_SPAN_ATTRIBUTES, attributes)
    _remember(_CONSTANTS, attributes, (attributes, encoded, _non_str(attributes)))
    return encoded


def _non_str(attributes: Attributes) -> tuple[int, ...]:
    return tuple(i for i, (_, value) in enumerate(attributes) if type(value) is not str)


def _same_types(seen: Attributes, attributes: Attributes, non_str: tuple[int, ...]) -> bool:
    """Whether two equal tuples hold values of the same types (array elements too, one level
    down), looking only where `seen` has values that are not str: a str equals only a str."""
    for i in non_str:
        a, b = seen[i][1], attributes[i][1]
        if type(a) is not type(b) or _element_types(a) != _element_types(b):
            return False
    return True


def _element_types(value: object) -> list[type] | None:
    return list(map(type, value)) if isinstance(value, tuple | list) else None


def _event(event: tuple[str, int, Attributes]) -> bytes:
    """Span.events (field 11): Event{time_unix_nano = 1, name = 2, attributes = 3}."""
    name, time_ns, attributes = event
    body = (
        _FIXED64.pack(_EVENT_TIME, time_ns)
        + _len_field(_EVENT_NAME, _utf8(name))
        + _attributes(_EVENT_ATTRIBUTES, attributes)
    )
    return _len_field(_SPAN_EVENTS, body)


def _status(message: str) -> bytes:
    """Span.status (field 15): Status{message = 2, code = 3}."""
    return _len_field(_SPAN_STATUS, _len_field(_STATUS_MESSAGE, _utf8(message)) + _STATUS_ERROR)


# --- attributes: repeated KeyValue{key = 1, value = 2: AnyValue} ----------------------------


class _Key(NamedTuple):
    """One attribute key's encodings under one field tag, made the first time it is seen.
    `kv` is KeyValue.key plus the tag of KeyValue.value; the others are a whole field but the
    value's last bytes, for the value types whose encoded size the type alone tells."""

    kv: bytes
    double: bytes  # + 8 bytes of the double
    small_int: bytes  # + one varint byte (0..127)
    int14: bytes  # + two varint bytes (128..16383)
    boolean: bytes  # + b"\x00" or b"\x01"


class _Caches(NamedTuple):
    """What `_attributes` remembers for one field tag (span, event, resource, data point)."""

    keys: dict[str, _Key]
    # (key, str or tuple of str) -> the whole field: a str equals only a str, so such a pair
    # is an exact key, while (key, 1) == (key, True) == (key, 1.0) would not be
    fields: dict[tuple[str, object], bytes]


def _attributes(tag: bytes, attributes: Iterable[tuple[str, object]]) -> bytes:
    """Each (key, value) as a KeyValue field `tag`; values that cannot be encoded are dropped.
    The per-span hot loop, so the common types are inlined: a str (or all-str array) pair
    comes whole from a cache; a small int, float or bool is a head per key plus its bytes;
    the rest goes to `_any_value`."""
    keys, fields = _BY_TAG.get(tag) or _caches(tag)
    out: list[bytes] = []
    append = out.append
    for pair in attributes:
        # Any: narrowed by `type(...) is`, which mypy follows only on the expression itself
        value: Any = pair[1]
        cls = type(value)
        if cls is str or cls is tuple:
            try:
                field = fields.get(pair)
            except TypeError:  # a tuple holding a list
                field = None
            if field is not None:
                append(field)
                continue
        elif value is None:
            continue
        heads = keys.get(pair[0]) or _key(tag, pair[0], keys)
        if cls is int and 0 <= value < 0x4000:  # status codes, most token counts
            if value < 0x80:
                append(heads.small_int + _SMALL[value])
            else:
                append(heads.int14 + _INT14.pack(value & 0x7F | 0x80 | value >> 7 << 8))
        elif cls is float:
            append(heads.double + _DOUBLE.pack(value))
        elif cls is bool:
            append(heads.boolean + (b"\x01" if value else b"\x00"))
        else:
            any_value = _any_value(value)
            if any_value is None:
                continue
            field = _len_field(tag, heads.kv + _len_field(b"", any_value))
            if type(pair) is tuple and (cls is str or _all_str(value)):
                _remember(fields, pair, field)
            append(field)
    return b"".join(out)


def _caches(tag: bytes) -> _Caches:
    caches = _BY_TAG[tag] = _Caches({}, {})  # a handful of tags: never cleared
    return caches


def _all_str(value: object) -> bool:
    """Whether `value` is a tuple of str, whose pair is an exact cache key like a str's."""
    return type(value) is tuple and all(type(v) is str for v in value)


def _key(tag: bytes, key: str, keys: dict[str, _Key]) -> _Key:
    kv = pb.length_delimited(1, _utf8(key)) + _KEYVALUE_VALUE
    heads = _Key(
        kv,
        tag + _head(kv, _ANY_DOUBLE, 8),
        tag + _head(kv, _ANY_INT, 1),
        tag + _head(kv, _ANY_INT, 2),
        tag + _head(kv, _ANY_BOOL, 1),
    )
    _remember(keys, key, heads)
    return heads


def _head(kv: bytes, value_tag: bytes, size: int) -> bytes:
    """A KeyValue's length, key, and AnyValue's length and tag, for a value of `size` bytes."""
    any_value = len(value_tag) + size
    return pb.varint(len(kv) + 1 + any_value) + kv + _SMALL[any_value] + value_tag


def _any_value(value: object) -> bytes | None:
    """The body of an AnyValue message, or None for a value OTLP attributes cannot carry.
    Inside the `value` oneof a default (false, 0, "") is still written: it is present."""
    if isinstance(value, str):
        return _len_field(_ANY_STRING, _utf8(value))
    if isinstance(value, bool):  # before int: bool is an int
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if isinstance(value, int):
        if _INT64_MIN <= value < _INT64_END:
            return _ANY_INT + _varint(value)
        return _len_field(_ANY_STRING, str(value).encode())  # wider than int64
    if isinstance(value, float):
        return _ANY_DOUBLE + _DOUBLE.pack(value)
    if isinstance(value, tuple | list):
        return _len_field(_ANY_ARRAY, _array(value))
    if isinstance(value, bytes):
        return _len_field(_ANY_BYTES, value)
    return None


def _array(values: Iterable[object]) -> bytes:
    """ArrayValue{values = 1: repeated AnyValue}; None and unsupported elements are skipped."""
    out = []
    for value in values:
        any_value = _any_value(value)
        if any_value is not None:
            out.append(_len_field(_ARRAY_VALUES, any_value))
    return b"".join(out)


# --- metrics ---------------------------------------------------------------------------------


def _instrument(instrument: Instrument, times: bytes) -> bytes:
    """ScopeMetrics.metrics (field 2): one Metric{name, description, unit, sum | histogram}."""
    if isinstance(instrument, Counter):
        data = _MONOTONIC + _CUMULATIVE + _counter_points(instrument, times)
        return _metric(instrument.name, instrument.description, instrument.unit, _METRIC_SUM, data)
    if isinstance(instrument, Histogram):
        data = _CUMULATIVE + _histogram_points(instrument, times)
        kind = _METRIC_HISTOGRAM
        return _metric(instrument.name, instrument.description, instrument.unit, kind, data)
    raise TypeError(f"no OTLP mapping for {type(instrument).__name__}")


def _metric(name: str, description: str, unit: str, kind: int, data: bytes) -> bytes:
    body = pb.string(_METRIC_NAME, name)
    body += pb.string(_METRIC_DESCRIPTION, description) if description else b""
    body += pb.string(_METRIC_UNIT, unit) if unit else b""
    return pb.length_delimited(2, body + pb.length_delimited(kind, data))


def _counter_points(counter: Counter, times: bytes) -> bytes:
    """Sum.data_points: a NumberDataPoint{attributes = 7, times, as_int | as_double} each."""
    names = counter.attributes
    return b"".join(
        [
            pb.length_delimited(
                _DATA_POINTS,
                _series_attributes(_NUMBER_ATTRIBUTES, names, key) + times + _number(value),
            )
            for key, value in list(counter.series.items())
        ]
    )


def _histogram_points(histogram: Histogram, times: bytes) -> bytes:
    """Histogram.data_points: a HistogramDataPoint each; the bounds are the same for all."""
    names = histogram.attributes
    bounds = pb.packed_double(_HISTOGRAM_BOUNDS, histogram.bounds)
    return b"".join(
        [
            pb.length_delimited(
                _DATA_POINTS,
                _series_attributes(_HISTOGRAM_ATTRIBUTES, names, key)
                + times
                + _histogram_point(point)
                + bounds,
            )
            for key, point in list(histogram.series.items())
        ]
    )


def _histogram_point(point: HistogramPoint) -> bytes:
    """count (4), sum (5), bucket_counts (6), and min (11) and max (12) where they were kept
    (the per-request accumulators skip them: they are optional in OTLP)."""
    body = _COUNT_SUM.pack(0x21, point.count, 0x29, point.sum)
    body += pb.packed_fixed64(_HISTOGRAM_BUCKETS, point.counts)
    if point.count and point.min <= point.max:
        body += _MIN_MAX.pack(0x59, point.min, 0x61, point.max)
    return body


def _series_attributes(tag: bytes, names: tuple[str, ...], key: tuple[object, ...]) -> bytes:
    """A series' attributes: its key's values under the instrument's names, "" and None left
    out; the overflow series carries only `otel.metric.overflow=true`."""
    if key == OVERFLOW:
        return _attributes(tag, ((OVERFLOW_ATTRIBUTE, True),))
    # A key of the wrong length is a recording bug; export what pairs up, not nothing.
    pairs = zip(names, key, strict=False)
    return _attributes(tag, [(n, v) for n, v in pairs if v is not None and v != ""])


def _gauge(gauge: Gauge, now_ns: int, times: bytes) -> bytes:
    """Metric{gauge = 5: Gauge{data_points}}, no start time; or, for a monotonic one (a
    running total read now), a cumulative monotonic Sum like a counter's."""
    time = times if gauge.monotonic else _FIXED64.pack(_POINT_TIME, now_ns)
    points = b"".join(
        [
            pb.length_delimited(
                _DATA_POINTS, _attributes(_NUMBER_ATTRIBUTES, attrs) + time + _number(value)
            )
            for attrs, value in gauge.points
        ]
    )
    if gauge.monotonic:
        data = _MONOTONIC + _CUMULATIVE + points
        return _metric(gauge.name, gauge.description, gauge.unit, _METRIC_SUM, data)
    return _metric(gauge.name, gauge.description, gauge.unit, _METRIC_GAUGE, points)


def _number(value: float) -> bytes:
    """NumberDataPoint's value oneof: as_int (6, sfixed64) for an int64, else as_double (4)."""
    if isinstance(value, int) and _INT64_MIN <= value < _INT64_END:
        return _AS_INT + _SFIXED64.pack(value)
    return _AS_DOUBLE + _DOUBLE.pack(float(value))


# --- helpers ---------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    """UTF-8, with a lone surrogate (which UTF-8 cannot carry) replaced by "?": one bad string
    must not fail the batch, and a collector rejects a string field that is not UTF-8."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace")


def _len_field(tag: bytes, data: bytes) -> bytes:
    n = len(data)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + data


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
