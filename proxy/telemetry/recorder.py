"""The Telemetry object: what every request records (SPEC §6 telemetry; issue 5).

`begin(exchange, scope)` continues the caller's W3C trace (or starts one) and decides
sampling; `finish(exchange)` adds the request to the accumulator of its attribute set and
hands a sampled span to the exporter. An accumulator holds, for one (operation, backend,
model, response model, status, error, subscription, API), the bucket counts and sums of
every histogram and the token totals; `collect()` projects the accumulators onto the
instruments (`gen_ai.client.*` with the conventions' attributes, `tollway.gateway.overhead`,
`tollway.requests`, `tollway.tokens`) when metrics are scraped or exported. So a request
costs one tuple, one dict lookup and a few bisects — no attribute maps, no per-instrument
lookups. A sampled span is encoded to OTLP bytes as the request finishes (after its
response went out) and queued as bytes for the export thread.

Accumulators are capped (`ACCUMULATORS`); beyond that, new attribute sets fold into one
overflow set (`otel.metric.overflow=true` on every instrument), counted.

`NoTelemetry` has the same methods and does nothing: the composition root picks one, and
the hot path never asks whether telemetry is on.
"""

from __future__ import annotations

import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from proxy.exchange import Exchange
from proxy.telemetry import genai as g
from proxy.telemetry.metrics import OVERFLOW, Counter, Gauge, HistogramPoint, Registry
from proxy.telemetry.otlp import SpanRecord, encode_span
from proxy.telemetry.prometheus import render
from proxy.telemetry.shared import Snapshots, merge
from proxy.telemetry.tracecontext import (
    SAMPLED,
    Sampler,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)
from proxy.types import Scope

SPAN_KIND_CLIENT = 3
_GENAI = (
    g.OPERATION_NAME, g.PROVIDER_NAME, g.REQUEST_MODEL, g.RESPONSE_MODEL,
    g.SERVER_ADDRESS, g.SERVER_PORT, g.ERROR_TYPE,
)  # fmt: skip
_TOKEN_USAGE = (*_GENAI[:4], g.TOKEN_TYPE, *_GENAI[4:6])


class Target(NamedTuple):
    """Where a backend is, for `server.*` and `gen_ai.provider.name`."""

    address: str
    port: int
    provider: str


def targets(urls: Mapping[str, str]) -> dict[str, Target]:
    """Backend id -> Target, from each single backend's URL."""
    out = {}
    for backend_id, url in urls.items():
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        out[backend_id] = Target(host, port, g.provider_of(host))
    return out


class _Keys(NamedTuple):
    """One attribute set's prepared series keys and span attributes."""

    genai: tuple[object, ...] | None  # None: not a GenAI operation
    input: tuple[object, ...]
    output: tuple[object, ...]
    requests: tuple[object, ...]
    overhead: tuple[object, ...]
    tokens_input: tuple[object, ...]
    tokens_output: tuple[object, ...]
    span_name: str
    span_constant: tuple[tuple[str, object], ...]
    error: str


ACCUMULATORS = 10_000  # distinct attribute sets per process before they fold


class _Accumulator:
    """What the requests of one attribute set added up, cumulative."""

    __slots__ = ("count", "duration", "first", "gaps", "input", "input_total", "keys",
                 "output", "output_total", "overhead")  # fmt: skip

    def __init__(self, keys: _Keys):
        self.keys = keys
        self.count = 0
        self.overhead = HistogramPoint(len(g.OVERHEAD_BUCKETS) + 1)
        self.duration = HistogramPoint(len(g.DURATION_BUCKETS) + 1)
        self.first = HistogramPoint(len(g.FIRST_CHUNK_BUCKETS) + 1)
        self.gaps = HistogramPoint(len(g.PER_CHUNK_BUCKETS) + 1)
        self.input = HistogramPoint(len(g.TOKEN_BUCKETS) + 1)
        self.output = HistogramPoint(len(g.TOKEN_BUCKETS) + 1)
        self.input_total = self.output_total = 0


class SpanSink(Protocol):
    def submit(self, item: Any) -> None: ...  # what `encode` made of a span record


class Telemetry:
    """Records each request's metrics and (when sampled and exported) its span."""

    def __init__(
        self,
        registry: Registry,
        *,
        spans: SpanSink | None = None,
        sampler: Sampler | None = None,
        gauges: Callable[[], Sequence[Gauge]] = tuple,
        shared: Snapshots | None = None,
        encode: Callable[[SpanRecord], Any] = encode_span,
    ):
        self.registry = registry
        self.shared = shared
        self._encode = encode
        self._spans = spans
        self._sampler = sampler if spans is not None else None
        self._gauges = gauges
        self._targets: dict[str, Target] = {}
        self._accumulators: dict[tuple[object, ...], _Accumulator] = {}
        self.folded = 0  # requests whose attribute set went to the overflow accumulator
        # perf_counter -> unix ns, for span times (one reading; drift over days is noise)
        self._epoch_ns = time.time_ns() - round(time.perf_counter() * 1e9)
        r = registry
        self.token_usage = r.histogram(
            g.TOKEN_USAGE, "{token}", "Number of input and output tokens used.",
            _TOKEN_USAGE, g.TOKEN_BUCKETS,
        )  # fmt: skip
        self.duration = r.histogram(
            g.OPERATION_DURATION, "s", "GenAI operation duration.", _GENAI, g.DURATION_BUCKETS
        )
        self.first_chunk = r.histogram(
            g.TIME_TO_FIRST_CHUNK, "s", "Time to receive the first chunk of a streamed response.",
            _GENAI, g.FIRST_CHUNK_BUCKETS,
        )  # fmt: skip
        self.per_chunk = r.histogram(
            g.TIME_PER_OUTPUT_CHUNK, "s", "Time per output chunk after the first one.",
            _GENAI, g.PER_CHUNK_BUCKETS,
        )  # fmt: skip
        self.overhead = r.histogram(
            g.OVERHEAD, "s", "Gateway time per request, time waiting on the backend excluded.",
            (g.API_ID, g.OPERATION_ID), g.OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.requests: Counter = r.counter(
            g.REQUESTS, "{request}", "Requests by API, operation, status code and error.",
            (g.API_ID, g.OPERATION_ID, g.STATUS_CODE, g.ERROR_TYPE),
        )  # fmt: skip
        self.tokens: Counter = r.counter(
            g.TOKENS, "{token}", "Tokens by subscription, model, API and token type.",
            (g.SUBSCRIPTION_ID, g.REQUEST_MODEL, g.API_ID, g.TOKEN_TYPE),
        )  # fmt: skip

    def use_backends(self, urls: Mapping[str, str]) -> None:
        """The backends of the config now serving (called on start and on every reload)."""
        self._targets = targets(urls)

    # -- per request

    def begin(self, exchange: Exchange, scope: Scope) -> None:
        """Continue the caller's trace or start one; mark the request for chunk timing."""
        exchange.time_chunks = True
        sampler = self._sampler
        if sampler is None:
            return
        parent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                parent = parse_traceparent(value)
                break
        if parent is None:  # a root: a trace the sampler drops is not started at all
            trace_id = new_trace_id()
            if sampler.sampled(trace_id, None):
                exchange.trace = (trace_id, new_span_id(), 0, SAMPLED)
            return
        flags = SAMPLED if sampler.sampled(parent.trace_id, parent) else 0
        exchange.trace = (parent.trace_id, new_span_id(), parent.span_id, flags)

    def finish(self, exchange: Exchange) -> None:
        """Record what the request did, however it ended."""
        now = time.perf_counter()
        ex = exchange
        key = (ex.operation, ex.backend_id, ex.model, ex.response_model, ex.status,
               ex.error_code, ex.subscription_id, ex.api_id)  # fmt: skip
        acc = self._accumulators.get(key)
        if acc is None:
            acc = self._accumulator(ex, key)
        acc.count += 1
        elapsed = now - ex.t0
        point = acc.overhead
        overhead = elapsed - ex.backend_seconds
        point.counts[bisect_left(g.OVERHEAD_BUCKETS, overhead)] += 1
        point.count += 1
        point.sum += overhead
        point = acc.duration
        point.counts[bisect_left(g.DURATION_BUCKETS, elapsed)] += 1
        point.count += 1
        point.sum += elapsed
        if ex.t_first:
            point, first = acc.first, ex.t_first - ex.t0
            point.counts[bisect_left(g.FIRST_CHUNK_BUCKETS, first)] += 1
            point.count += 1
            point.sum += first
            if ex.gaps is not None:
                acc.gaps.merge(ex.gaps)
        usage = ex.usage
        if usage is not None:  # spelled out, not a helper per histogram: ~0.1 us a call here
            tokens = usage.prompt_tokens
            point = acc.input
            point.counts[bisect_left(g.TOKEN_BUCKETS, tokens)] += 1
            point.count += 1
            point.sum += tokens
            acc.input_total += tokens
            tokens = usage.completion_tokens
            point = acc.output
            point.counts[bisect_left(g.TOKEN_BUCKETS, tokens)] += 1
            point.count += 1
            point.sum += tokens
            acc.output_total += tokens
        trace = ex.trace
        if trace is not None and trace[3] & SAMPLED and self._spans is not None:
            keys = acc.keys if acc.keys is not _OVERFLOW_KEYS else self._keys(ex)  # its own
            self._spans.submit(self._encode(self.span_record(ex, keys, trace, now)))

    def collect(self) -> None:
        """Project the accumulators onto the instruments (before a scrape or an export);
        safe from the export thread while requests keep adding up."""
        requests: dict[tuple[object, ...], float] = {}
        tokens: dict[tuple[object, ...], float] = {}
        overhead: dict[tuple[object, ...], HistogramPoint] = {}
        genai: tuple[dict[tuple[object, ...], HistogramPoint], ...] = ({}, {}, {})
        usage: dict[tuple[object, ...], HistogramPoint] = {}
        for acc in list(self._accumulators.values()):
            k = acc.keys
            requests[k.requests] = requests.get(k.requests, 0) + acc.count
            _add(overhead, k.overhead, acc.overhead)
            if acc.input.count or acc.output.count:
                tokens[k.tokens_input] = tokens.get(k.tokens_input, 0) + acc.input_total
                tokens[k.tokens_output] = tokens.get(k.tokens_output, 0) + acc.output_total
            if k.genai is None:
                continue
            for series, point in zip(genai, (acc.duration, acc.first, acc.gaps), strict=True):
                _add(series, k.genai, point)
            _add(usage, k.input, acc.input)
            _add(usage, k.output, acc.output)
        self.requests.series, self.tokens.series = requests, tokens
        self.overhead.series, self.token_usage.series = overhead, usage
        self.duration.series, self.first_chunk.series, self.per_chunk.series = genai[:3]
        self.requests.folded = self.folded

    def metrics_text(self) -> bytes:
        """`GET /metrics`: the Prometheus exposition of this process's metrics, plus the
        other workers' when the server runs several (reads files: call off the loop)."""
        registry, gauges = self.snapshot()
        if self.shared is None:
            return render(registry, gauges)
        return render(*merge(registry, gauges, self.shared.others()))

    def snapshot(self) -> tuple[Registry, Sequence[Gauge]]:
        """Collected instruments and gauges, as an OTLP export or a shared snapshot reads them."""
        self.collect()
        return self.registry, self._gauges()

    # -- internals

    def _accumulator(self, ex: Exchange, key: tuple[object, ...]) -> _Accumulator:
        """The accumulator for a new attribute set (or the overflow one, once full)."""
        if len(self._accumulators) >= ACCUMULATORS:
            self.folded += 1
            acc = self._accumulators.get(OVERFLOW)
            if acc is None:
                acc = self._accumulators[OVERFLOW] = _Accumulator(_OVERFLOW_KEYS)
            return acc
        acc = self._accumulators[key] = _Accumulator(self._keys(ex))
        return acc

    def _keys(self, ex: Exchange) -> _Keys:
        target = self._targets.get(ex.backend_id) or Target("", 0, "openai")
        op_name = g.OPERATION_NAMES.get(ex.operation)
        port = target.port or None
        error = error_type(ex.status, ex.error_code)
        genai = None
        if op_name is not None:
            genai = (op_name, target.provider, ex.model, ex.response_model or ex.model,
                     target.address, port, error)  # fmt: skip
        head = genai[:4] if genai is not None else ()
        tail = genai[4:6] if genai is not None else ()
        constant: tuple[tuple[str, object], ...] = (
            (g.API_ID, ex.api_id),
            (g.OPERATION_ID, ex.operation),
        )
        if genai is not None:
            constant += tuple(zip(_GENAI[:3], genai[:3], strict=True))
            constant += ((g.SERVER_ADDRESS, target.address), (g.SERVER_PORT, port))
            constant += ((g.RESPONSE_MODEL, ex.response_model or None),)
        # the rest of the accumulator's key: the same for every request that shares it
        constant += ((g.STATUS_CODE, ex.status), (g.SUBSCRIPTION_ID, ex.subscription_id or None))
        if error:
            constant += ((g.ERROR_TYPE, error),)
        name = f"{op_name} {ex.model}".rstrip() if op_name else f"{ex.method} {ex.api_id}"
        return _Keys(
            genai,
            (*head, "input", *tail),
            (*head, "output", *tail),
            (ex.api_id, ex.operation, ex.status, error),
            (ex.api_id, ex.operation),
            (ex.subscription_id, ex.model, ex.api_id, "input"),
            (ex.subscription_id, ex.model, ex.api_id, "output"),
            name,
            constant,
            error,
        )

    def span_record(
        self, ex: Exchange, keys: _Keys, trace: tuple[int, int, int, int], now: float
    ) -> SpanRecord:
        """The span of a finished request."""
        epoch, usage = self._epoch_ns, ex.usage
        attributes: list[tuple[str, object]] = []
        if keys.genai is not None:
            attributes += (
                ("gen_ai.request.max_tokens", ex.max_tokens),
                ("gen_ai.request.stream", ex.stream),
                ("gen_ai.response.finish_reasons", ex.finish_reasons or None),
            )
            if ex.t_first:
                attributes.append(("gen_ai.response.time_to_first_chunk", ex.t_first - ex.t0))
        if usage is not None:
            attributes += (
                ("gen_ai.usage.input_tokens", usage.prompt_tokens),
                ("gen_ai.usage.output_tokens", usage.completion_tokens),
                ("gen_ai.usage.cache_read.input_tokens", usage.cached_tokens or None),
                ("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens or None),
            )
        attributes.append(("tollway.overhead", now - ex.t0 - ex.backend_seconds))
        # W3C flags plus OTLP's "has is-remote" bit, and "is remote" when the parent came in
        flags = trace[3] | 0x100 | (0x200 if trace[2] else 0)
        return SpanRecord(
            trace[0], trace[1], trace[2], keys.span_name, SPAN_KIND_CLIENT,
            epoch + round(ex.t0 * 1e9), epoch + round(now * 1e9),
            keys.span_constant, tuple(attributes), tuple(ex.events or ()),
            keys.error, flags,
        )  # fmt: skip


class NoTelemetry:
    """Telemetry switched off: the same calls, nothing recorded."""

    registry = None
    shared = None

    def use_backends(self, urls: Mapping[str, str]) -> None:
        pass

    def begin(self, exchange: Exchange, scope: Scope) -> None:
        pass

    def finish(self, exchange: Exchange) -> None:
        pass

    def metrics_text(self) -> bytes:
        return b""


def _add(
    series: dict[tuple[object, ...], HistogramPoint], key: tuple[object, ...], point: HistogramPoint
) -> None:
    """Sum `point` into `series[key]` (a fresh point: the accumulator's keeps counting)."""
    if not point.count:
        return
    into = series.get(key)
    if into is None:
        into = series[key] = HistogramPoint(len(point.counts))
    into.merge(point)


_OVERFLOW_KEYS = _Keys(
    OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW, "overflow", (), ""
)


def error_type(status: int, error_code: str) -> str:
    """`error.type`: the gateway's error code, else a failed status; "" for a success."""
    return error_code or (str(status) if status >= 400 else "")


def gateway_id() -> str:
    """The `Gateway ID` dimension: this host's name."""
    return socket.gethostname()
