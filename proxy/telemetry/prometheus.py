"""Prometheus text exposition (format 0.0.4) of a metrics registry, for `GET /metrics`.

Names follow OpenTelemetry's Prometheus compatibility rules: characters outside
`[a-zA-Z0-9_:]` become `_`, the unit becomes a suffix (`s` -> `_seconds`; annotations in
braces such as `{token}` are dropped), counters end in `_total`. Label names are sanitised
the same way; empty label values are left out. Pure: registry in, bytes out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from proxy.telemetry.metrics import (
    OVERFLOW,
    OVERFLOW_ATTRIBUTE,
    Counter,
    Gauge,
    Histogram,
    HistogramPoint,
    Instrument,
)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}


def metric_name(name: str, unit: str, suffix: str = "") -> str:
    base = _INVALID.sub("_", name)
    unit = re.sub(r"\{[^}]*\}", "", unit)
    word = _UNITS.get(unit, _INVALID.sub("_", unit))
    if word and not base.endswith("_" + word):
        base += "_" + word
    if suffix and not base.endswith(suffix):
        base += suffix
    if base[:1].isdigit():
        base = "_" + base
    return base


def label_name(name: str) -> str:
    label = _INVALID.sub("_", name).replace(":", "_")
    return "_" + label if label[:1].isdigit() else label


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs if v is not None and v != "")
    return "{" + inner + "}" if inner else ""


def _pairs(instrument: Instrument, key: tuple[object, ...]) -> list[tuple[str, object]]:
    if key == OVERFLOW:
        return [(label_name(OVERFLOW_ATTRIBUTE), "true")]
    return [(label_name(a), v) for a, v in zip(instrument.attributes, key, strict=True)]


def _header(lines: list[str], name: str, description: str, kind: str) -> None:
    lines.append(f"# HELP {name} {_escape(description)}")
    lines.append(f"# TYPE {name} {kind}")


def _counter(lines: list[str], counter: Counter) -> None:
    name = metric_name(counter.name, counter.unit, "_total")
    _header(lines, name, counter.description, "counter")
    for key, value in list(counter.series.items()):
        lines.append(f"{name}{_labels(_pairs(counter, key))} {_value(value)}")


def _histogram(lines: list[str], histogram: Histogram) -> None:
    name = metric_name(histogram.name, histogram.unit)
    _header(lines, name, histogram.description, "histogram")
    bounds = [*(_value(b) for b in histogram.bounds), "+Inf"]
    for key, point in list(histogram.series.items()):
        pairs = _pairs(histogram, key)
        _buckets(lines, name, pairs, bounds, point)
        labels = _labels(pairs)
        lines.append(f"{name}_sum{labels} {_value(point.sum)}")
        lines.append(f"{name}_count{labels} {point.count}")


def _buckets(
    lines: list[str],
    name: str,
    pairs: list[tuple[str, object]],
    bounds: list[str],
    point: HistogramPoint,
) -> None:
    running = 0
    for le, count in zip(bounds, point.counts, strict=True):
        running += count
        lines.append(f"{name}_bucket{_labels([*pairs, ('le', le)])} {running}")


def render(instruments: Iterable[Instrument], gauges: Iterable[Gauge] = ()) -> bytes:
    """The exposition of every instrument with at least one series, and the gauges."""
    lines: list[str] = []
    for instrument in instruments:
        if not instrument.series:
            continue
        if isinstance(instrument, Counter):
            _counter(lines, instrument)
        elif isinstance(instrument, Histogram):
            _histogram(lines, instrument)
    for gauge in gauges:
        total = "_total" if gauge.monotonic else ""
        name = metric_name(gauge.name, gauge.unit, total)
        _header(lines, name, gauge.description, "counter" if gauge.monotonic else "gauge")
        for labels, value in gauge.points:
            lines.append(f"{name}{_labels((label_name(k), v) for k, v in labels)} {_value(value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""
