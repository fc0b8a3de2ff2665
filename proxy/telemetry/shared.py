"""One `/metrics` for all of a server's workers.

With `tollway serve --workers N`, a scrape reaches one worker process, and each counts only
what it served; a scraper that saw worker 1 then worker 2 would read counters going back.
So every worker writes a snapshot of its metrics to a directory the server made
(`TOLLWAY_METRICS_DIR`) once a second, from a daemon thread, and `/metrics` sums the other
workers' snapshots with its own live figures: counters and histograms add up; gauges take
the largest value, monotonic ones add up. A worker that exited leaves its last snapshot,
so totals never go back (as prometheus_client's multiprocess mode does). Figures from other
workers are at most one interval old.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import msgspec

from proxy.telemetry.metrics import (
    OVERFLOW,
    Counter,
    Gauge,
    Histogram,
    HistogramPoint,
    Instrument,
    Registry,
)

ENV = "TOLLWAY_METRICS_DIR"
INTERVAL = 1.0  # seconds between snapshots

Key = tuple[object, ...]


class _Series(msgspec.Struct, array_like=True):
    key: list[object]
    value: float = 0.0  # a counter's
    counts: list[int] = []  # a histogram's
    sum: float = 0.0
    count: int = 0


class _Metric(msgspec.Struct, array_like=True):
    name: str
    kind: str  # "counter" | "histogram" | "gauge" | "monotonic"
    unit: str
    description: str
    attributes: list[str]
    bounds: list[float]
    series: list[_Series]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[_Metric])


def snapshot(instruments: Iterable[Instrument], gauges: Sequence[Gauge]) -> bytes:
    metrics = []
    for i in instruments:
        if isinstance(i, Counter):
            rows = [_Series(list(k), value=v) for k, v in list(i.series.items())]
            metrics.append(_Metric(i.name, "counter", i.unit, i.description,
                                   list(i.attributes), [], rows))  # fmt: skip
        elif isinstance(i, Histogram):
            rows = [_Series(list(k), counts=list(p.counts), sum=p.sum, count=p.count)
                    for k, p in list(i.series.items())]  # fmt: skip
            metrics.append(_Metric(i.name, "histogram", i.unit, i.description,
                                   list(i.attributes), list(i.bounds), rows))  # fmt: skip
    for g in gauges:
        names = sorted({k for attrs, _ in g.points for k, _ in attrs})
        rows = [_Series([dict(attrs).get(n, "") for n in names], value=v) for attrs, v in g.points]
        kind = "monotonic" if g.monotonic else "gauge"
        metrics.append(_Metric(g.name, kind, g.unit, g.description, names, [], rows))
    return _encoder.encode(metrics)


def merge(
    own: Iterable[Instrument], own_gauges: Sequence[Gauge], others: Iterable[bytes]
) -> tuple[list[Instrument], list[Gauge]]:
    """This worker's live instruments and gauges plus the other workers' snapshots."""
    parsed = [_decoder.decode(snapshot(own, own_gauges))]
    for data in others:
        with contextlib.suppress(msgspec.DecodeError):  # a torn or foreign file
            parsed.append(_decoder.decode(data))
    instruments: dict[str, Instrument] = {}
    gauges: dict[str, tuple[_Metric, dict[Key, float]]] = {}
    for metrics in parsed:
        for m in metrics:
            if m.kind in ("gauge", "monotonic"):
                _merge_gauge(gauges, m)
            else:
                _merge_instrument(instruments, m)
    out_gauges = [_gauge(m, values) for m, values in gauges.values()]
    return list(instruments.values()), out_gauges


def _gauge(m: _Metric, values: dict[Key, float]) -> Gauge:
    points = tuple((tuple(zip(m.attributes, k, strict=True)), v) for k, v in values.items())
    return Gauge(m.name, m.unit, m.description, points, m.kind == "monotonic")


def _key(values: list[object]) -> Key:
    key = tuple(values)
    return OVERFLOW if key == OVERFLOW else key


def _merge_instrument(into: dict[str, Instrument], m: _Metric) -> None:
    known = into.get(m.name)
    if m.kind == "counter":
        counter = known if isinstance(known, Counter) else None
        if counter is None:
            counter = Counter(m.name, m.unit, m.description, m.attributes, limit=1 << 62)
            into[m.name] = counter
        for row in m.series:
            key = _key(row.key)
            counter.series[key] = counter.series.get(key, 0) + row.value
        return
    histogram = known if isinstance(known, Histogram) else None
    if histogram is None:
        histogram = Histogram(m.name, m.unit, m.description, m.attributes, m.bounds, 1 << 62)
        into[m.name] = histogram
    for row in m.series:
        if len(row.counts) != len(histogram.bounds) + 1:
            continue  # buckets changed between versions: not addable
        point = histogram.series.setdefault(_key(row.key), HistogramPoint(len(row.counts)))
        for i, n in enumerate(row.counts):
            point.counts[i] += n
        point.sum += row.sum
        point.count += row.count


def _merge_gauge(into: dict[str, tuple[_Metric, dict[Key, float]]], m: _Metric) -> None:
    _, values = into.setdefault(m.name, (m, {}))
    for row in m.series:
        key = tuple(row.key)
        if m.kind == "monotonic":
            values[key] = values.get(key, 0) + row.value
        else:
            values[key] = max(values.get(key, row.value), row.value)


class Snapshots:
    """This worker's snapshot file in the shared directory, rewritten every INTERVAL by a
    daemon thread, and the other workers' files, read for a scrape."""

    def __init__(
        self,
        directory: str,
        read: Callable[[], tuple[Registry, Sequence[Gauge]]],
        log: logging.Logger,
    ):
        self.directory = Path(directory)
        self._read = read
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._path = self.directory / f"{os.getpid()}.metrics"

    def start(self) -> None:
        self._path = self.directory / f"{os.getpid()}.metrics"  # after a fork: this worker's
        self._thread = threading.Thread(target=self._run, name="tollway-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write a last snapshot (blocking; call off the event loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(INTERVAL * 2)
        self.write()

    def write(self) -> None:
        try:
            registry, gauges = self._read()
            data = snapshot(registry, gauges)
            part = self._path.with_suffix(".part")
            part.write_bytes(data)
            part.replace(self._path)  # atomic: a reader sees the old or the new file
        except Exception:  # telemetry never takes a worker down
            self._log.exception("tollway: writing the metrics snapshot failed")

    def others(self) -> list[bytes]:
        out = []
        for path in self.directory.glob("*.metrics"):
            if path != self._path:
                with contextlib.suppress(OSError):
                    out.append(path.read_bytes())
        return out

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.write()
