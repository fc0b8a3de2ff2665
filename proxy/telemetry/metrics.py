"""In-process metric aggregation: counters and explicit-bucket histograms, cumulative.

Why not the OpenTelemetry SDK's instruments: on this machine one SDK histogram `record` with
four attributes costs ~8 µs and a span ~20 µs (bench/RESULTS.md, issue 5), against a budget
of a few µs per request for all telemetry (issue 5: ≤ 5 % of throughput). Here a series is
found by a tuple of attribute values (in the instrument's attribute order), and recording is
a dict lookup plus a `bisect`. The aggregates have OpenTelemetry's shape (cumulative sums and
explicit-bucket histograms with upper-inclusive bounds) and are exported as OTLP
(`proxy.telemetry.otlp`) and as Prometheus text (`proxy.telemetry.prometheus`).

Cardinality is capped per instrument (OpenTelemetry's cardinality limit): once an instrument
holds `limit` series, measurements for new attribute sets go to one overflow series marked
`otel.metric.overflow=true`, and `Registry.folded` counts them per instrument.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeVar

OVERFLOW: tuple[str, ...] = ("\x00overflow",)  # the overflow series' key (not a real value)
OVERFLOW_ATTRIBUTE = "otel.metric.overflow"
DEFAULT_LIMIT = 2000  # series per instrument


class Instrument:
    """What both kinds share: identity, attribute names, series and the cardinality cap."""

    __slots__ = ("attributes", "description", "folded", "limit", "name", "series", "unit")

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        attributes: Sequence[str],
        limit: int = DEFAULT_LIMIT,
    ):
        self.name = name
        self.unit = unit
        self.description = description
        self.attributes = tuple(attributes)
        self.limit = limit
        self.folded = 0  # measurements sent to the overflow series
        self.series: dict[tuple[object, ...], object] = {}

    def _admit(self, key: tuple[object, ...]) -> tuple[object, ...]:
        """The key for a new attribute set: itself, or OVERFLOW once the instrument is full."""
        if len(self.series) < self.limit:
            return key
        self.folded += 1
        return OVERFLOW


class Counter(Instrument):
    """A monotonic sum per attribute set."""

    __slots__ = ()
    series: dict[tuple[object, ...], float]  # type: ignore[assignment]

    def add(self, value: float, key: tuple[object, ...]) -> None:
        series = self.series
        if key not in series:
            key = self._admit(key)
        series[key] = series.get(key, 0) + value


class HistogramPoint:
    """One series of a histogram: bucket counts (len(bounds) + 1), sum, count, min, max."""

    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self, buckets: int):
        self.counts = [0] * buckets
        self.sum = 0.0
        self.count = 0
        self.min = float("inf")
        self.max = float("-inf")

    def add(self, value: float, index: int) -> None:
        self.counts[index] += 1
        self.sum += value
        self.count += 1
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: HistogramPoint) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)


class Histogram(Instrument):
    """Explicit-bucket histogram; bucket i counts values in (bounds[i-1], bounds[i]]."""

    __slots__ = ("bounds",)
    series: dict[tuple[object, ...], HistogramPoint]  # type: ignore[assignment]

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        attributes: Sequence[str],
        bounds: Sequence[float],
        limit: int = DEFAULT_LIMIT,
    ):
        super().__init__(name, unit, description, attributes, limit)
        self.bounds = tuple(float(b) for b in bounds)

    def record(self, value: float, key: tuple[object, ...]) -> None:
        point = self.series.get(key)
        if point is None:
            point = self._point(key)
        point.add(value, bisect_left(self.bounds, value))

    def _point(self, key: tuple[object, ...]) -> HistogramPoint:
        key = self._admit(key)
        point = self.series.get(key)
        if point is None:
            point = self.series[key] = HistogramPoint(len(self.bounds) + 1)
        return point


class Gauge(NamedTuple):
    """A value read when metrics are exported or scraped, one per attribute set; with
    `monotonic`, a running total kept elsewhere (exported as a cumulative counter)."""

    name: str
    unit: str
    description: str
    points: tuple[tuple[tuple[tuple[str, object], ...], float | int], ...]
    monotonic: bool = False


_I = TypeVar("_I", bound=Instrument)


class Registry:
    """The instruments of one process, made once; read by the exporters."""

    def __init__(self) -> None:
        self.start_ns = time.time_ns()  # the cumulative series' start
        self._instruments: dict[str, Instrument] = {}

    def counter(self, name: str, unit: str, description: str, attributes: Sequence[str]) -> Counter:
        return self._add(Counter(name, unit, description, attributes))

    def histogram(
        self,
        name: str,
        unit: str,
        description: str,
        attributes: Sequence[str],
        bounds: Sequence[float],
    ) -> Histogram:
        return self._add(Histogram(name, unit, description, attributes, bounds))

    def __iter__(self) -> Iterator[Instrument]:
        return iter(list(self._instruments.values()))

    def get(self, name: str) -> Instrument | None:
        return self._instruments.get(name)

    def folded(self) -> dict[str, int]:
        """Measurements folded into overflow series, by instrument (only those with any)."""
        return {i.name: i.folded for i in self._instruments.values() if i.folded}

    def _add(self, instrument: _I) -> _I:
        known = self._instruments.get(instrument.name)
        if known is not None:
            if type(known) is not type(instrument) or known.attributes != instrument.attributes:
                raise ValueError(f"metric {instrument.name!r} is already defined differently")
            return known
        self._instruments[instrument.name] = instrument
        return instrument
