"""The hand-written OTLP encoder (proxy/telemetry/otlp.py): every body is decoded with the
official opentelemetry-proto classes and each field compared, types included (True is not 1,
1.0 is not 1, and floats are compared bit for bit)."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterable

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Metric,
    NumberDataPoint,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from proxy.telemetry import otlp, protobuf
from proxy.telemetry.metrics import OVERFLOW_ATTRIBUTE, Gauge, Registry
from proxy.telemetry.otlp import (
    SpanRecord,
    encode_metrics,
    encode_span,
    encode_span_request,
    encode_spans,
)

RESOURCE = (("service.name", "tollway"), ("service.instance.id", "abc"), ("process.pid", 42))
SCOPE, VERSION = "tollway", "0.1.0"
T0 = 1_700_000_000_123_456_789
Attrs = tuple[tuple[str, object], ...]


def span(**fields: object) -> SpanRecord:
    base = SpanRecord(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        parent_id=0x00F067AA0BA902B7,
        name="chat gpt-4o-mini",
        kind=otlp.SPAN_KIND_CLIENT,
        start_ns=T0,
        end_ns=T0 + 250_000_000,
        constant=(("gen_ai.operation.name", "chat"), ("server.port", 443)),
        attributes=(("http.response.status_code", 200),),
        events=(),
        error="",
        flags=0x301,
    )
    return base._replace(**fields)


def decode_spans(body: bytes) -> tuple[ExportTraceServiceRequest, list[Span]]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    assert len(request.resource_spans) == 1
    assert len(request.resource_spans[0].scope_spans) == 1
    return request, list(request.resource_spans[0].scope_spans[0].spans)


def decode_metrics(body: bytes) -> tuple[ExportMetricsServiceRequest, dict[str, Metric]]:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    assert len(request.resource_metrics) == 1
    scope_metrics = request.resource_metrics[0].scope_metrics
    assert len(scope_metrics) == 1
    assert scope_metrics[0].scope.name == SCOPE and scope_metrics[0].scope.version == VERSION
    metrics = {m.name: m for m in scope_metrics[0].metrics}
    assert len(metrics) == len(scope_metrics[0].metrics), "a metric was sent twice"
    return request, metrics


def value_of(any_value: AnyValue) -> object:
    kind = any_value.WhichOneof("value")
    assert kind is not None, "an AnyValue with nothing set"
    if kind == "array_value":
        return tuple(value_of(v) for v in any_value.array_value.values)
    return getattr(any_value, kind)


def typed(value: object) -> object:
    """A form where == also compares types, and floats bit for bit (NaN, -0.0)."""
    if isinstance(value, tuple | list):
        return ("array", tuple(typed(v) for v in value))
    if isinstance(value, float):
        return (float, struct.pack("<d", value))
    return (type(value), value)


def decoded(attributes: Iterable[KeyValue]) -> list[tuple[str, object]]:
    return [(kv.key, typed(value_of(kv.value))) for kv in attributes]


def expected(attributes: Attrs) -> list[tuple[str, object]]:
    """What the encoder promises: None dropped (in arrays too), ints wider than int64 as
    their decimal string, lists as arrays."""
    out = []
    for key, value in attributes:
        value = normalized(value)
        if value is not None:
            out.append((key, typed(value)))
    return out


def normalized(value: object) -> object:
    if isinstance(value, tuple | list):
        return tuple(n for n in map(normalized, value) if n is not None)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)
    return value


# --- spans ------------------------------------------------------------------------------------

EVERY_TYPE: Attrs = (
    ("str", "value"),
    ("empty.str", ""),
    ("true", True),
    ("false", False),
    ("int.zero", 0),
    ("int", 1234),
    ("float", 0.25),
    ("float.zero", 0.0),
    ("str.array", ("stop", "length")),
    ("int.array", (1, 2, 3)),
    ("float.array", [0.5, 1.5]),
    ("empty.array", ()),
    ("bytes", b"\x00\xff"),
    ("none", None),
)


def test_a_span_round_trips_every_field() -> None:
    record = span(
        attributes=EVERY_TYPE,
        events=(
            ("gen_ai.content.prompt", T0 + 5, (("gen_ai.prompt", "hi"), ("n", 2))),
            ("first.chunk", T0 + 9_000_000, ()),
        ),
        error="upstream_timeout",
    )
    request, [got] = decode_spans(encode_spans([record], RESOURCE, SCOPE, VERSION))

    resource_spans = request.resource_spans[0]
    assert decoded(resource_spans.resource.attributes) == expected(RESOURCE)
    scope = resource_spans.scope_spans[0].scope
    assert (scope.name, scope.version) == (SCOPE, VERSION)

    assert got.trace_id == bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
    assert got.span_id == bytes.fromhex("b7ad6b7169203331")
    assert got.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert got.trace_state == ""
    assert got.name == "chat gpt-4o-mini"
    assert got.kind == Span.SPAN_KIND_CLIENT
    assert got.start_time_unix_nano == T0
    assert got.end_time_unix_nano == T0 + 250_000_000
    assert got.flags == 0x301
    assert decoded(got.attributes) == expected(record.constant + EVERY_TYPE)
    assert [(e.name, e.time_unix_nano, decoded(e.attributes)) for e in got.events] == [
        ("gen_ai.content.prompt", T0 + 5, [("gen_ai.prompt", (str, "hi")), ("n", (int, 2))]),
        ("first.chunk", T0 + 9_000_000, []),
    ]
    assert got.HasField("status")
    assert got.status.code == Status.STATUS_CODE_ERROR
    assert got.status.message == "upstream_timeout"
    assert (got.dropped_attributes_count, len(got.links)) == (0, 0)


def test_a_root_span_has_no_parent_and_no_status() -> None:
    record = span(parent_id=0, constant=(), attributes=(), flags=0x101, kind=2)
    _, [got] = decode_spans(encode_spans([record], RESOURCE, SCOPE, VERSION))
    assert got.parent_span_id == b""
    assert not got.HasField("status")
    assert got.status.code == Status.STATUS_CODE_UNSET
    assert (len(got.attributes), len(got.events)) == (0, 0)
    assert (got.kind, got.flags) == (Span.SPAN_KIND_SERVER, 0x101)


@pytest.mark.parametrize(
    ("trace_id", "span_id"),
    [(1, 1), (2**128 - 1, 2**64 - 1), (1 << 64, 1 << 63), ((1 << 64) - 1, 255)],
)
def test_ids_are_big_endian_and_fixed_width(trace_id: int, span_id: int) -> None:
    record = span(trace_id=trace_id, span_id=span_id, parent_id=span_id)
    _, [got] = decode_spans(encode_spans([record], RESOURCE, SCOPE, VERSION))
    assert got.trace_id == trace_id.to_bytes(16, "big")
    assert got.span_id == got.parent_span_id == span_id.to_bytes(8, "big")


def test_unicode_names_keys_and_values() -> None:
    long = "ü" * 100  # 200 bytes: lengths past one varint byte
    record = span(
        name="chat モデル — 🚀",
        constant=(("gen_ai.request.model", "модель-7b"),),
        attributes=(("ключ", "значение ✓"), ("long", long), ("array", ("日本", "ß", "😀"))),
        events=(("évènement", T0, (("😀", "ok"),)),),
        error="délai dépassé",
    )
    _, [got] = decode_spans(encode_spans([record], RESOURCE, SCOPE, VERSION))
    assert got.name == "chat モデル — 🚀"
    assert decoded(got.attributes) == expected(record.constant + record.attributes)
    assert got.events[0].name == "évènement"
    assert decoded(got.events[0].attributes) == [("😀", (str, "ok"))]
    assert got.status.message == "délai dépassé"


def test_a_lone_surrogate_is_replaced_not_fatal() -> None:
    record = span(name="a\ud800b", attributes=(("k", "x\udfffy"),), error="\ud800")
    _, [got] = decode_spans(encode_spans([record], RESOURCE, SCOPE, VERSION))
    assert got.name == "a?b"
    assert decoded(got.attributes)[-1] == ("k", (str, "x?y"))
    assert got.status.message == "?"


INTS = [0, 1, 127, 128, 255, 16383, 16384, 2**21, 2**31, 2**32, 2**63 - 1, -1, -128, -(2**31), -(2**63)]  # fmt: skip


@pytest.mark.parametrize("value", INTS)
def test_int_attributes_cover_the_int64_range(value: int) -> None:
    record = span(constant=(("const", value),), attributes=(("int", value), ("arr", (value, 1))))
    _, [got] = decode_spans(encode_spans([record], RESOURCE, SCOPE, VERSION))
    assert decoded(got.attributes) == [
        ("const", (int, value)),
        ("int", (int, value)),
        ("arr", ("array", ((int, value), (int, 1)))),
    ]


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_ints_wider_than_int64_go_out_as_strings(value: int) -> None:
    _, [got] = decode_spans(
        encode_spans([span(attributes=(("big", value),))], RESOURCE, SCOPE, VERSION)
    )
    assert decoded(got.attributes)[-1] == ("big", (str, str(value)))


@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, math.nan, -0.0, 5e-324, 1.7976931348623157e308]
)
def test_floats_round_trip_bit_for_bit(value: float) -> None:
    _, [got] = decode_spans(
        encode_spans([span(attributes=(("f", value),))], RESOURCE, SCOPE, VERSION)
    )
    assert decoded(got.attributes)[-1] == ("f", typed(value))


def test_values_it_cannot_carry_are_dropped() -> None:
    attributes: Attrs = (("none", None), ("obj", object()), ("dict", {"a": 1}), ("kept", "yes"), ("arr", ("a", None, object(), "b")))  # fmt: skip
    _, [got] = decode_spans(encode_spans([span(attributes=attributes)], RESOURCE, SCOPE, VERSION))
    assert decoded(got.attributes)[-2:] == [("kept", (str, "yes")), ("arr", ("array", ((str, "a"), (str, "b"))))]  # fmt: skip


def test_many_spans_keep_their_order_and_fields() -> None:
    rng = random.Random(7)
    constants = [
        (("gen_ai.request.model", f"model-{i}"), ("server.port", 8000 + i)) for i in range(3)
    ]
    records = [
        span(
            trace_id=rng.getrandbits(128) or 1,
            span_id=rng.getrandbits(64) or 1,
            parent_id=rng.getrandbits(64) if i % 3 else 0,
            name=f"span {i}",
            start_ns=T0 + i,
            end_ns=T0 + i + rng.randrange(10**9),
            constant=constants[i % 3],
            attributes=(("i", i), ("tokens", rng.randrange(10**6))),
            error="boom" if i % 5 == 0 else "",
        )
        for i in range(2000)
    ]
    body = encode_spans(records, RESOURCE, SCOPE, VERSION)
    _, got = decode_spans(body)
    assert len(got) == len(records)
    for record, s in zip(records, got, strict=True):
        assert s.trace_id == record.trace_id.to_bytes(16, "big")
        assert s.span_id == record.span_id.to_bytes(8, "big")
        assert s.parent_span_id == (
            record.parent_id.to_bytes(8, "big") if record.parent_id else b""
        )
        assert (s.name, s.start_time_unix_nano, s.end_time_unix_nano) == (
            record.name,
            record.start_ns,
            record.end_ns,
        )
        assert decoded(s.attributes) == expected(record.constant + record.attributes)
        assert s.HasField("status") == bool(record.error)


def test_no_spans_is_an_empty_request() -> None:
    assert encode_spans([], RESOURCE, SCOPE, VERSION) == b""


def test_equal_constants_of_different_types_do_not_share_an_encoding() -> None:
    # (("x", 1),) == (("x", True),) == (("x", 1.0),): a cache keyed by == alone would mix them
    variants: list[Attrs] = [
        (("x", 1), ("y", "s")),
        (("x", True), ("y", "s")),
        (("x", 1.0), ("y", "s")),
        (("x", (1, 2)), ("y", "s")),
        (("x", (True, 2.0)), ("y", "s")),
    ]
    for _ in range(2):  # the second round reads the cache
        for constant in variants:
            fresh = tuple(list(constant))  # an equal tuple, not the cached object
            for c in (constant, fresh):
                _, [got] = decode_spans(
                    encode_spans([span(constant=c, attributes=())], RESOURCE, SCOPE, VERSION)
                )
                assert decoded(got.attributes) == expected(constant)


def test_an_unhashable_constant_is_encoded_without_the_cache() -> None:
    constant: Attrs = (("finish_reasons", ["stop", "length"]), ("n", 1))
    for _ in range(2):
        _, [got] = decode_spans(
            encode_spans([span(constant=constant, attributes=())], RESOURCE, SCOPE, VERSION)
        )
        assert decoded(got.attributes) == expected(constant)


def test_the_caches_stay_bounded_and_correct_past_their_size() -> None:
    records = [span(constant=(("route", f"r{i}"),), attributes=(("k", f"v{i}"), (f"key{i}", i))) for i in range(3000)]  # fmt: skip
    _, got = decode_spans(encode_spans(records, RESOURCE, SCOPE, VERSION))
    assert [decoded(s.attributes) for s in got] == [
        expected(r.constant + r.attributes) for r in records
    ]
    caches = otlp._BY_TAG[b"\x4a"]  # Span.attributes
    for cache in (otlp._CONSTANTS, caches.keys, caches.fields):
        assert 0 < len(cache) <= otlp._CACHE_SIZE


def test_the_resource_cache_tells_equal_resources_of_different_types_apart() -> None:
    for resource in [(("a", 1),), (("a", True),), (("a", 1.0),), (("a", 1),)]:
        request, _ = decode_spans(encode_spans([span()], resource, SCOPE, VERSION))
        assert decoded(request.resource_spans[0].resource.attributes) == expected(resource)
    request, _ = decode_spans(encode_spans([span()], [("a", ["x"])], "other", ""))
    assert decoded(request.resource_spans[0].resource.attributes) == [
        ("a", ("array", ((str, "x"),)))
    ]
    scope = request.resource_spans[0].scope_spans[0].scope
    assert (scope.name, scope.version) == ("other", "")


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth == 0 else 7)
    if kind == 0:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD800), rng.randrange(0x10000, 0x110000)])) for _ in range(rng.randrange(0, 150)))  # fmt: skip
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-(2**63), 2**63)
    if kind == 3:
        return rng.randrange(-300, 20000)
    if kind == 4:
        return struct.unpack("<d", rng.randbytes(8))[0]  # any double, NaNs and infinities too
    if kind == 5:
        return rng.choice([0.0, -1.5, 1e300, rng.uniform(-1e6, 1e6)])
    if kind == 6:
        return rng.choice([None, rng.randrange(2**64, 2**70)])
    return tuple(random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6)))


def random_attributes(rng: random.Random) -> Attrs:
    return tuple((f"k{rng.randrange(1000)}.é" if rng.random() < 0.2 else f"k{i}", random_value(rng)) for i in range(rng.randrange(0, 12)))  # fmt: skip


def test_random_attributes_round_trip_exactly() -> None:
    rng = random.Random(20240601)
    constants = [random_attributes(rng) for _ in range(20)]
    for _ in range(40):
        records = [
            span(
                constant=rng.choice(constants),
                attributes=random_attributes(rng),
                events=tuple(
                    (f"e{j}", T0 + j, random_attributes(rng)) for j in range(rng.randrange(3))
                ),
            )
            for _ in range(rng.randrange(1, 30))
        ]
        resource = random_attributes(rng)
        request, got = decode_spans(encode_spans(records, resource, SCOPE, VERSION))
        assert decoded(request.resource_spans[0].resource.attributes) == expected(resource)
        for record, s in zip(records, got, strict=True):
            assert decoded(s.attributes) == expected(record.constant + record.attributes)
            assert [decoded(e.attributes) for e in s.events] == [
                expected(e[2]) for e in record.events
            ]


# --- metrics ----------------------------------------------------------------------------------


def number_points(
    points: Iterable[NumberDataPoint],
) -> list[tuple[list[tuple[str, object]], object]]:
    out = []
    for p in points:
        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
        out.append((decoded(p.attributes), typed(value)))
    return out


def test_a_counter_is_a_cumulative_monotonic_sum() -> None:
    registry = Registry()
    requests = registry.counter(
        "tollway.requests", "{request}", "Requests handled.", ["api", "code", "error"]
    )
    requests.add(1, ("openai", 200, ""))
    requests.add(2, ("openai", 200, ""))
    requests.add(1, ("openai", 429, "rate_limited"))
    requests.add(1, ("other", None, None))
    tokens = registry.counter("tollway.tokens", "{token}", "", ["type"])
    tokens.add(0.5, ("input",))
    tokens.add(0.25, ("input",))
    now = T0 + 60 * 10**9
    _, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, now))

    m = metrics["tollway.requests"]
    assert (m.description, m.unit, m.WhichOneof("data")) == (
        "Requests handled.",
        "{request}",
        "sum",
    )
    assert m.sum.is_monotonic
    assert m.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
    assert number_points(m.sum.data_points) == [
        ([("api", (str, "openai")), ("code", (int, 200))], (int, 3)),
        (
            [("api", (str, "openai")), ("code", (int, 429)), ("error", (str, "rate_limited"))],
            (int, 1),
        ),
        ([("api", (str, "other"))], (int, 1)),
    ]
    for p in m.sum.data_points:
        assert (p.start_time_unix_nano, p.time_unix_nano) == (registry.start_ns, now)
    m = metrics["tollway.tokens"]
    assert (m.description, m.unit) == ("", "{token}")
    assert number_points(m.sum.data_points) == [([("type", (str, "input"))], typed(0.75))]


def test_a_histogram_point_carries_buckets_bounds_sum_count_min_and_max() -> None:
    registry = Registry()
    duration = registry.histogram(
        "gen_ai.client.operation.duration", "s", "Duration.", ["model"], [0.1, 1.0, 10.0]
    )
    for value in (0.05, 0.1, 0.5, 3.0, 3.0, 42.0):
        duration.record(value, ("gpt",))
    duration.record(0.2, ("small",))
    now = T0 + 10**9
    _, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, now))
    m = metrics["gen_ai.client.operation.duration"]
    assert (m.unit, m.description, m.WhichOneof("data")) == ("s", "Duration.", "histogram")
    assert m.histogram.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
    gpt, small = m.histogram.data_points
    assert decoded(gpt.attributes) == [("model", (str, "gpt"))]
    assert list(gpt.bucket_counts) == [2, 1, 2, 1]  # upper-inclusive: 0.1 counts in (-inf, 0.1]
    assert list(gpt.explicit_bounds) == [0.1, 1.0, 10.0]
    assert gpt.count == 6
    assert gpt.sum == pytest.approx(48.65)
    assert gpt.sum == duration.series[("gpt",)].sum  # bit for bit
    assert (gpt.HasField("min"), gpt.min, gpt.max) == (True, 0.05, 42.0)
    assert (gpt.start_time_unix_nano, gpt.time_unix_nano) == (registry.start_ns, now)
    assert list(small.bucket_counts) == [0, 1, 0, 0]
    assert (small.count, small.sum, small.min, small.max) == (1, 0.2, 0.2, 0.2)


def test_a_histogram_without_bounds_has_one_bucket() -> None:
    registry = Registry()
    registry.histogram("h", "", "", [], []).record(7.0, ())
    _, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, T0))
    [point] = metrics["h"].histogram.data_points
    assert (list(point.bucket_counts), list(point.explicit_bounds), point.count) == ([1], [], 1)
    assert len(point.attributes) == 0


def test_the_overflow_series_is_marked() -> None:
    registry = Registry()
    counter = registry.counter("c", "", "", ["model"])
    counter.limit = 2
    histogram = registry.histogram("h", "", "", ["model"], [1.0])
    histogram.limit = 1
    for model in ("a", "b", "c", "d"):
        counter.add(1, (model,))
        histogram.record(2.0, (model,))
    _, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, T0))
    overflow = [(OVERFLOW_ATTRIBUTE, (bool, True))]
    assert number_points(metrics["c"].sum.data_points) == [
        ([("model", (str, "a"))], (int, 1)),
        ([("model", (str, "b"))], (int, 1)),
        (overflow, (int, 2)),
    ]
    a, rest = metrics["h"].histogram.data_points
    assert decoded(a.attributes) == [("model", (str, "a"))]
    assert (decoded(rest.attributes), rest.count, list(rest.bucket_counts)) == (overflow, 3, [0, 3])


FOLDED: tuple[tuple[Attrs, float | int], ...] = (
    ((("metric", "c"),), 3),
    ((("metric", "h"), ("k", True)), 0.5),
)


def test_gauges_are_read_at_export_time() -> None:
    registry = Registry()
    gauges = [
        Gauge("tollway.limits.store.unavailable", "", "1 while down.", (((), 1),)),
        Gauge("tollway.telemetry.metric.folded", "{measurement}", "", FOLDED),
        Gauge("wide", "", "", (((), 2**64), ((), -(2**63)))),
        Gauge("no.points", "", "", ()),
    ]
    now = T0 + 5
    _, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, now, gauges))
    assert set(metrics) == {
        "tollway.limits.store.unavailable",
        "tollway.telemetry.metric.folded",
        "wide",
    }
    m = metrics["tollway.limits.store.unavailable"]
    assert (m.description, m.WhichOneof("data")) == ("1 while down.", "gauge")
    assert number_points(m.gauge.data_points) == [([], (int, 1))]
    m = metrics["tollway.telemetry.metric.folded"]
    assert m.unit == "{measurement}"
    assert number_points(m.gauge.data_points) == [
        ([("metric", (str, "c"))], (int, 3)),
        ([("metric", (str, "h")), ("k", (bool, True))], typed(0.5)),
    ]
    for p in m.gauge.data_points:
        assert (p.time_unix_nano, p.start_time_unix_nano) == (now, 0)
    # as_int is sfixed64: wider than int64 goes out as a double
    assert number_points(metrics["wide"].gauge.data_points) == [
        ([], typed(float(2**64))),
        ([], (int, -(2**63))),
    ]


def test_metrics_carry_the_resource() -> None:
    registry = Registry()
    registry.counter("c", "", "", []).add(2**63 - 1, ())
    request, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, T0))
    assert decoded(request.resource_metrics[0].resource.attributes) == expected(RESOURCE)
    assert number_points(metrics["c"].sum.data_points) == [([], (int, 2**63 - 1))]


def test_an_empty_registry_is_an_empty_request() -> None:
    registry = Registry()
    assert encode_metrics(registry, RESOURCE, SCOPE, VERSION, T0) == b""
    registry.counter("c", "", "", ["a"])
    registry.histogram("h", "s", "", ["a"], [1.0])
    assert encode_metrics(registry, RESOURCE, SCOPE, VERSION, T0, [Gauge("g", "", "", ())]) == b""
    request = ExportMetricsServiceRequest()
    request.ParseFromString(b"")
    assert len(request.resource_metrics) == 0


# --- the wire-format writer -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "wire"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2**63 - 1, b"\xff" * 8 + b"\x7f"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
        (-1, b"\xff" * 9 + b"\x01"),
        (-(2**63), b"\x80" * 9 + b"\x01"),
    ],
)
def test_varint(n: int, wire: bytes) -> None:
    assert protobuf.varint(n) == wire


def test_field_writers_match_the_reference_encoding() -> None:
    point = NumberDataPoint(
        start_time_unix_nano=T0, time_unix_nano=2**64 - 1, as_double=-2.5, flags=300
    )
    mine = (
        protobuf.fixed64(2, T0)
        + protobuf.fixed64(3, 2**64 - 1)
        + protobuf.double(4, -2.5)
        + protobuf.uint(8, 300)
    )
    assert mine == point.SerializeToString(deterministic=True)
    assert protobuf.sfixed64(6, -5) == NumberDataPoint(as_int=-5).SerializeToString()
    assert protobuf.fixed32(16, 0x301) == Span(flags=0x301).SerializeToString()
    assert protobuf.string(5, "né") == Span(name="né").SerializeToString()
    assert protobuf.packed_fixed64(1, []) == protobuf.packed_double(1, []) == b""


def test_monotonic_gauge_is_a_cumulative_sum_since_the_registry_start() -> None:
    registry = Registry()
    dropped = Gauge("tollway.telemetry.spans.dropped", "", "d", (((), 7),), monotonic=True)
    now = T0 + 9
    _, metrics = decode_metrics(encode_metrics(registry, RESOURCE, SCOPE, VERSION, now, [dropped]))
    m = metrics["tollway.telemetry.spans.dropped"]
    assert m.WhichOneof("data") == "sum"
    assert m.sum.is_monotonic and m.sum.aggregation_temporality == 2
    assert number_points(m.sum.data_points) == [([], (int, 7))]
    (point,) = m.sum.data_points
    assert (point.start_time_unix_nano, point.time_unix_nano) == (registry.start_ns, now)


def test_spans_encoded_one_by_one_make_the_same_request() -> None:
    records = [span(attributes=EVERY_TYPE, error="e" if i % 2 else "") for i in range(5)]
    whole = encode_spans(records, RESOURCE, SCOPE, VERSION)
    one_by_one = encode_span_request([encode_span(r) for r in records], RESOURCE, SCOPE, VERSION)
    assert one_by_one == whole
    _, got = decode_spans(one_by_one)
    assert [s.status.message for s in got] == ["", "e", "", "e", ""]
    assert encode_span_request([], RESOURCE, SCOPE, VERSION) == b""
