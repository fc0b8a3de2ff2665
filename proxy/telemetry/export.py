"""OTLP/HTTP transport: a daemon thread that batches span records and POSTs them, and POSTs
the metrics every interval, so that nothing about the collector ever reaches a request.

    event loop ── submit(item) ──▶ deque (bounded) ──▶ export thread: encode, gzip, POST
                 append; count a drop                  retry 429/502/503/504, else drop

`submit` is the only method the hot path calls: a length check and a `deque.append`, which is
atomic under the GIL, so there is no lock. It sets a `threading.Event` only when the queue
reaches `max_batch`, once per batch, so a busy gateway is not held to `schedule_delay`
(~90 ns a call on the dev machine, timeit, queue full or not). Encoding (`encode_spans`,
`encode_metrics`) runs on the export thread, while the event loop keeps recording: the
metrics encoder must copy what it iterates (`list(d.items())` is atomic under the GIL,
iterating a dict that grows is not). The thread never
raises: every failure is counted (`failed_exports`, `failed_spans`), kept in `last_error`
and logged at most once a minute with a count of what was kept quiet.

Configuration: `proxy.telemetry.otlpenv`.
"""

from __future__ import annotations

import gzip
import logging
import math
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from proxy.telemetry.otlpenv import ExportSettings, Target
from proxy.units import retry_after_delay

T = TypeVar("T")

RETRYABLE = frozenset({429, 502, 503, 504})  # OTLP/HTTP spec, "Retryable Response Codes"
ATTEMPTS = 3  # per batch, all within the signal's timeout
BACKOFF = 1.0  # seconds before the first retry when the collector gives no Retry-After
LOG_INTERVAL = 60.0  # seconds between two logged failures
MAX_RESPONSE = 64 * 1024  # bytes of a response body read; a longer one ends the connection


class _Endpoint:
    """One signal's collector: the request it makes and a kept-alive connection to it.
    Used by the export thread only."""

    def __init__(self, target: Target):
        parts = urlsplit(target.url)
        self.timeout = target.timeout
        self.gzip = target.compression == "gzip"
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fixed = {"content-type": "application/x-protobuf", "user-agent": "tollway"}
        if self.gzip:
            fixed["content-encoding"] = "gzip"
        self._headers = {**dict(target.headers), **fixed}
        self._conn: HTTPConnection
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=target.certificate or None)
            if target.client_certificate:
                context.load_cert_chain(target.client_certificate, target.client_key or None)
            self._conn = HTTPSConnection(parts.hostname or "", parts.port, context=context)
        else:
            self._conn = HTTPConnection(parts.hostname or "", parts.port)

    def post(self, body: bytes, timeout: float) -> tuple[int, str, str | None]:
        """POST `body` once: (status, reason, Retry-After). Raises OSError or HTTPException
        when no response arrives. A kept-alive connection the collector has closed meanwhile
        is replaced once, at once: that is not a failure of the collector."""
        reused = self._conn.sock is not None
        try:
            return self._exchange(body, timeout)
        except (ConnectionResetError, BrokenPipeError, HTTPException):
            if not reused:
                raise
            return self._exchange(body, timeout)

    def _exchange(self, body: bytes, timeout: float) -> tuple[int, str, str | None]:
        conn = self._conn
        conn.timeout = timeout  # for connect()
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request("POST", self._path, body, self._headers)
            with conn.getresponse() as response:
                response.read(MAX_RESPONSE)  # drained, so the connection can be reused
                if not response.isclosed():
                    conn.close()
                return response.status, response.reason, response.getheader("retry-after")
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._conn.close()


class Exporter(Generic[T]):
    """Exports span records (queued by `submit`) and metrics (pulled every interval) over
    OTLP/HTTP from a daemon thread. Make and `start` it in the process that serves (after a
    fork, in each worker). Counters are written by one thread each and may be read from any:
    exported_spans, exported_metrics, dropped_spans (queue full), failed_spans,
    failed_exports (POSTs and encodings that failed, and unexpected errors), last_error."""

    def __init__(
        self,
        settings: ExportSettings,
        encode_spans: Callable[[list[T]], bytes],
        encode_metrics: Callable[[], bytes] | None,
        log: logging.Logger,
    ):
        self._settings = settings
        self._encode_spans = encode_spans
        self._encode_metrics = encode_metrics
        self._log = log
        self._max_queue = settings.max_queue
        self._wake_at = settings.max_batch - 1  # the queue length whose append wakes the thread
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh queue, events, connections and counters (the TLS context is built here, so
        a bad certificate file raises at startup)."""
        self._queue: deque[T] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cap = math.inf  # monotonic time by which shutdown wants the thread done
        self._traces = _Endpoint(self._settings.traces) if self._settings.traces.url else None
        metrics = self._settings.metrics.url and self._encode_metrics is not None
        self._metrics = _Endpoint(self._settings.metrics) if metrics else None
        self._quiet_until, self._quieted = -math.inf, 0
        self.exported_spans = self.exported_metrics = 0
        self.dropped_spans = self.failed_spans = self.failed_exports = 0
        self.last_error = ""

    def start(self) -> None:
        """Start the export thread; a no-op while it runs. Where a thread ran before (a
        forked child of a process that exported, or after `shutdown`) it starts afresh:
        the parent's queue, connections and counters are the parent's."""
        if self._thread is not None:
            if self._thread.is_alive():
                return
            self._reset()
        self._thread = threading.Thread(target=self._run, name="tollway-otlp", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> None:
        """Queue one span record; when the queue is full, drop it and count it. Called from
        the event loop thread: no lock, no I/O, no encoding. (From several threads it stays
        safe, but `dropped_spans` may undercount and a batch may wait for the delay.)"""
        queue = self._queue
        size = len(queue)
        if size >= self._max_queue:
            self.dropped_spans += 1
            return
        queue.append(item)
        if size == self._wake_at:
            self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued and the metrics once more, then stop; returns within
        `timeout` whatever the collector does (a POST under way when time is up is left to
        its own timeout on the daemon thread). Blocks: from the event loop, run it in a
        thread. Calling it again waits for the thread again."""
        if not self._stopping.is_set():
            self._cap = time.monotonic() + timeout
            self._stopping.set()
            self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the export thread ----------------------------------------------------------------

    def _run(self) -> None:
        max_batch = self._settings.max_batch
        spans_due = time.monotonic() + self._settings.schedule_delay
        metrics_due = time.monotonic() + self._settings.metric_interval
        while not self._stopping.is_set():
            if len(self._queue) < max_batch:
                self._wake.wait(max(0.0, min(spans_due, metrics_due) - time.monotonic()))
            self._wake.clear()  # before reading the length, so no wake-up is lost
            now = time.monotonic()
            pending = len(self._queue)
            if now >= spans_due:
                spans_due = now + self._settings.schedule_delay
            else:
                pending -= pending % max_batch  # full batches only until the delay is up
            self._guarded(self._export_spans, pending)
            if now >= metrics_due:
                metrics_due = now + self._settings.metric_interval
                self._guarded(self._export_metrics)
        self._guarded(self._flush)

    def _guarded(self, work: Callable[..., None], *args: int) -> None:
        """Run `work`; an exception is counted and logged, and the thread goes on."""
        try:
            work(*args)
        except Exception as exc:
            self._complain(f"unexpected error: {exc!r}", exc)
            self.failed_exports += 1
            self._stopping.wait(0.1)  # a bug that raises every time must not spin the CPU

    def _flush(self) -> None:
        try:
            while self._queue and time.monotonic() < self._cap:
                self._export_spans(len(self._queue))
            if time.monotonic() < self._cap:
                self._export_metrics()
        finally:
            for endpoint in (self._traces, self._metrics):
                if endpoint is not None:
                    endpoint.close()

    def _export_spans(self, count: int) -> None:
        """Export the oldest `count` span records in batches of at most max_batch."""
        while count > 0:
            size = min(count, self._settings.max_batch)
            count -= size
            batch = [self._queue.popleft() for _ in range(size)]
            if self._traces is None:
                continue  # traces are off: the records are discarded
            try:
                body = self._encode_spans(batch)
            except Exception as exc:
                self._fail(size, f"encoding {size} spans failed: {exc!r}", exc)
                continue
            if self._post(self._traces, body, f"{size} spans"):
                self.exported_spans += size
            else:
                self._fail(size)

    def _export_metrics(self) -> None:
        if self._metrics is None or self._encode_metrics is None:
            return
        try:
            body = self._encode_metrics()
        except Exception as exc:
            self._fail(0, f"encoding metrics failed: {exc!r}", exc)
            return
        if not body:
            return  # nothing recorded yet
        if self._post(self._metrics, body, "metrics"):
            self.exported_metrics += 1
        else:
            self._fail(0)

    def _fail(self, spans: int, problem: str = "", exc: BaseException | None = None) -> None:
        if problem:
            self._complain(problem, exc)
        self.failed_spans += spans
        self.failed_exports += 1  # last: whoever sees the count sees last_error too

    def _post(self, endpoint: _Endpoint, body: bytes, what: str) -> bool:
        """POST within the endpoint's timeout, retrying what the OTLP/HTTP spec calls
        retryable (429/502/503/504, no response) with backoff or the collector's Retry-After;
        False (and logged) when the data is dropped."""
        if endpoint.gzip:  # level 1: 1.3 us a span against 3.5 at 6, for 46 bytes against 43
            body = gzip.compress(body, compresslevel=1, mtime=0)
        deadline = time.monotonic() + endpoint.timeout
        backoff, problem = BACKOFF, "no time left before shutdown"
        for attempt in range(1, ATTEMPTS + 1):
            remaining = min(deadline, self._cap) - time.monotonic()
            if remaining <= 0:
                break
            try:
                status, reason, retry_after = endpoint.post(body, remaining)
            except (OSError, HTTPException) as exc:
                problem, wait = f"{type(exc).__name__}: {exc}", None
            else:
                if 200 <= status < 300:
                    return True
                problem = f"HTTP {status} {reason}"
                if status not in RETRYABLE:
                    break
                wait = retry_after_delay(retry_after)
            if attempt == ATTEMPTS:
                break
            if wait is None:
                wait = backoff * random.uniform(0.8, 1.2)  # jitter: workers do not align
            backoff *= 2
            if not self._pause(wait, deadline):
                break
        self._complain(f"exporting {what} failed, dropped: {problem}")
        return False

    def _pause(self, seconds: float, deadline: float) -> bool:
        """Sleep `seconds` unless that passes the deadline or shutdown's; False if it would."""
        end = time.monotonic() + seconds
        if end >= min(deadline, self._cap):
            return False
        if not self._stopping.wait(end - time.monotonic()):
            return True
        if end >= min(deadline, self._cap):  # shutdown began and moved the cap
            return False
        time.sleep(max(0.0, end - time.monotonic()))
        return True

    def _complain(self, problem: str, exc: BaseException | None = None) -> None:
        """Keep `problem` as last_error; log it unless a problem was logged in the last
        LOG_INTERVAL, so a dead collector does not flood the log."""
        self.last_error = problem
        now = time.monotonic()
        if now < self._quiet_until:
            self._quieted += 1
            return
        quieted = f" ({self._quieted} more since the last report)" if self._quieted else ""
        self._log.warning("OTLP export: %s%s", problem, quieted, exc_info=exc)
        self._quiet_until, self._quieted = now + LOG_INTERVAL, 0
