"""The per-request record: what one request did, read by the error guard, the access log and
the telemetry (spans, metrics)."""

from __future__ import annotations

import time
from bisect import bisect_left

from proxy.schemas import Usage
from proxy.telemetry.genai import PER_CHUNK_BUCKETS
from proxy.telemetry.metrics import HistogramPoint
from proxy.types import Headers, Send


class Exchange:
    """Everything the gateway learns about one request while serving it."""

    __slots__ = (
        "api_id",
        "backend_id",
        "backend_seconds",
        "cache",
        "client_ip",
        "disconnected",
        "error_code",
        "events",
        "finish_reasons",
        "gaps",
        "max_tokens",
        "method",
        "model",
        "operation",
        "path",
        "product_id",
        "request_id",
        "response_model",
        "started",
        "status",
        "stream",
        "subscription_id",
        "t0",
        "t_first",
        "t_last",
        "time_chunks",
        "trace",
        "usage",
    )

    def __init__(self, method: str, path: str, request_id: str, client_ip: str):
        self.t0 = time.perf_counter()
        self.method = method
        self.path = path
        self.request_id = request_id
        self.client_ip = client_ip
        self.api_id = self.operation = self.subscription_id = self.product_id = ""
        self.backend_id = self.model = self.error_code = ""
        self.cache = ""  # the semantic cache's answer: "hit", "miss", "skip", "error" or ""
        self.stream = False
        self.disconnected = False  # did the client leave before the response ended?
        self.started = False  # has the response start been sent?
        self.status = 0
        self.backend_seconds = 0.0  # time spent waiting on the backend
        self.usage: Usage | None = None
        self.response_model = ""
        self.finish_reasons: tuple[str, ...] = ()
        self.max_tokens: int | None = None
        self.t_first = 0.0  # when the first streamed chunk went to the client (perf_counter)
        self.t_last = 0.0
        self.time_chunks = False  # aggregate the gaps between chunks (set by the telemetry)
        self.gaps: HistogramPoint | None = None
        # (trace id, span id, parent span id, flags) when the request is traced
        self.trace: tuple[int, int, int, int] | None = None
        self.events: list[tuple[str, int, tuple[tuple[str, object], ...]]] | None = None

    def add_backend_time(self, seconds: float) -> None:
        self.backend_seconds += seconds

    def chunk(self, now: float) -> None:
        """A streamed chunk went to the client at `now` (perf_counter)."""
        last, self.t_last = self.t_last, now
        if not last:
            self.t_first = now
        elif self.time_chunks:
            gaps = self.gaps
            if gaps is None:
                gaps = self.gaps = HistogramPoint(len(PER_CHUNK_BUCKETS) + 1)
            gap = now - last
            gaps.add(gap, bisect_left(PER_CHUNK_BUCKETS, gap))

    def event(self, name: str, attributes: tuple[tuple[str, object], ...] = ()) -> None:
        """Something for the request's span to show (a limit refusal, a cache hit, a block)."""
        if self.trace is not None:
            if self.events is None:
                self.events = []
            self.events.append((name, time.time_ns(), attributes))

    def overhead_ms(self) -> float:
        """Gateway time so far, excluding time spent waiting on the backend."""
        return (time.perf_counter() - self.t0 - self.backend_seconds) * 1000.0

    def stamp(self, headers: Headers) -> Headers:
        """Add the gateway's own response headers (request id, overhead)."""
        headers.append((b"x-request-id", self.request_id.encode("latin-1")))
        headers.append((b"x-tollway-overhead-ms", b"%.3f" % self.overhead_ms()))
        return headers

    async def start(self, send: Send, status: int, headers: Headers) -> None:
        """Send the response start, stamped; marks the response as started."""
        self.status = status
        self.started = True
        await send(
            {"type": "http.response.start", "status": status, "headers": self.stamp(headers)}
        )
