"""Streaming load generator: keep N streamed chat completions open and time every SSE event.

Usage::

    taskset -c 0 python -m bench.streams --url http://127.0.0.1:19800/v1/chat/completions \\
        --streams 200 --duration 8 [--warmup 2] [--ramp 1] [--header 'api-key: KEY'] \\
        [--body '{"model":"gpt-4o-mini","messages":[...],"stream":true}']

Keeps ``--streams`` POSTs with ``"stream": true`` in flight for ``--duration`` seconds after
``--warmup``, starting the next one on the same keep-alive connection as soon as one ends; the
first N are opened evenly over ``--ramp`` seconds. Only streams *started* inside the measured
window count. Prints one JSON object on stdout:

* ``ttft_ms``: request written -> first read holding an SSE event whose ``"content"`` is a
  non-empty string (the role-only ``"content":""`` chunk does not count);
* ``gap_ms``: time between successive SSE events (split on ``\\n\\n``) of a stream that arrive
  in *different* reads; events arriving in the same read as an earlier one are counted in
  ``same_read`` instead (their gap is 0). ``max_stall_ms`` is the largest gap of any stream;
* ``errors`` (by kind in ``error_kinds``): connection failures, non-200 replies, unparseable
  responses, bodies not ending in ``data: [DONE]``; ``unfinished``: counted streams still open
  when the window closed;
* streams that never get going show in no gap, so at the window's end: ``open_streams`` (any,
  counted or not), ``awaiting_response`` (of those, no response byte yet), ``connecting``
  (slots without a connection) and ``pending_max_ms``, the longest any open stream had been
  waiting for its next event (or its first, since the request). ``pending_max_ms`` far above
  ``max_stall_ms`` means streams were stuck, e.g. behind a server's concurrency limit;
* ``events_per_s`` (all streams), ``cpu_s``/``cpu_util`` of this process over the window and
  ``saturated`` (true above 90 % of a core: the generator itself was the limit).

Built for one core beside the backend: raw asyncio Protocols, httptools for the response, one
``perf_counter()`` per read and a few bytes operations per event; nothing is JSON-decoded.
Importable as ``await run(url, streams, duration, warmup, headers, body, ramp)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import ssl
import sys
import time
from array import array
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httptools
import uvloop

DEFAULT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark in one sentence."}],
    "stream": True,
}
SAMPLE_CAP = 4_000_000  # samples kept per series (32 MB); a uniform reservoir beyond that
SATURATED = 0.9  # CPU share of one core above which the generator is its own bottleneck
CONNECT_TIMEOUT_S = 10.0
ERROR_BACKOFF_S = 0.01  # after a connection-level error, so a dead port is not a busy loop

_SEP = b"\n\n"
_DONE = b"[DONE]\n\n"  # "data: [DONE]" or "data:[DONE]" as the last event
# A non-empty JSON string value of "content"; `"content":""` (role chunk) and null don't match.
_CONTENT = re.compile(rb'"content"\s*:\s*"[^"]')
_perf = time.perf_counter

Headers = Mapping[str, str] | Sequence[tuple[str, str]] | None
Body = bytes | str | Mapping[str, Any] | None


class _Samples:
    """Float samples in an ``array('d')``: all of them up to SAMPLE_CAP, then a reservoir."""

    __slots__ = ("data", "max", "n")

    def __init__(self) -> None:
        self.data = array("d")
        self.n = 0
        self.max = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        if x > self.max:
            self.max = x
        if self.n <= SAMPLE_CAP:
            self.data.append(x)
        else:
            j = random.randrange(self.n)
            if j < SAMPLE_CAP:
                self.data[j] = x

    def max_ms(self) -> float | None:
        return _ms(self.max) if self.n else None

    def percentiles_ms(self, qs: Sequence[float]) -> list[float | None]:
        """Linear-interpolated percentiles (numpy's default method), in ms."""
        if not self.data:
            return [None] * len(qs)
        try:
            import numpy as np
        except ImportError:
            values = sorted(self.data)
            out = []
            for q in qs:
                pos = (len(values) - 1) * q / 100
                lo = int(pos)
                hi = min(lo + 1, len(values) - 1)
                out.append(values[lo] + (values[hi] - values[lo]) * (pos - lo))
        else:
            out = np.percentile(np.frombuffer(self.data, dtype=np.float64), list(qs)).tolist()
        return [_ms(x) for x in out]


class _Stats:
    """Counters shared by all connections; `counting` is true inside the measured window."""

    __slots__ = (
        "completed",
        "connections",
        "counting",
        "error_kinds",
        "errors",
        "events",
        "gaps",
        "inflight",
        "retries",
        "same_read",
        "started",
        "ttft",
    )

    def __init__(self) -> None:
        self.counting = False
        self.events = 0  # events received by any stream, counted or not (for events/s)
        self.connections = 0
        self.started = 0
        self.completed = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.inflight = 0  # counted streams not finished yet
        self.retries = 0
        self.same_read = 0
        self.ttft = _Samples()
        self.gaps = _Samples()

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one stream at a time; all timing happens here."""

    __slots__ = (
        "_content",
        "_counted",
        "_done",
        "_eof_body",
        "_framed",
        "_fut",
        "_last",
        "_now",
        "_st",
        "_status",
        "_tail",
        "alive",
        "parser",
        "received",
        "streams",
        "t0",
        "transport",
    )

    def __init__(self, stats: _Stats) -> None:
        self._st = stats
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self.streams = 0  # requests written on this connection
        self._fut: asyncio.Future[str | None] | None = None
        self._reset(False)

    def _reset(self, counted: bool) -> None:
        self._counted = counted
        self.t0 = 0.0  # request written
        self._now = 0.0  # current read's arrival time
        self._last = 0.0  # previous read that completed an event of this stream
        self._tail = b""  # bytes of an event not complete yet
        self._status = 0
        self._content = False
        self._done = False
        self._framed = False
        self._eof_body = False
        self.received = False

    # -- driven by the worker

    def start(self, request: bytes, counted: bool) -> asyncio.Future[str | None]:
        """Write one request; the future gets None on success or an error kind."""
        assert self.transport is not None
        self._reset(counted)
        fut = self._fut = asyncio.get_running_loop().create_future()
        self.streams += 1
        self.t0 = _perf()
        self.transport.write(request)
        return fut

    def waiting_ms(self, now: float) -> float | None:
        """How long the stream in flight (if any) has waited for its next event."""
        if self._fut is None:
            return None
        return (now - (self._last or self.t0)) * 1000

    def abort(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._now = _perf()
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish("parse", keep=False)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self._fut is None:
            return
        if exc is None and self._eof_body and self._status:
            self._finish(self._outcome(), keep=False)  # body delimited by the close
        else:
            self._finish("closed", keep=False)

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length" or lower == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:  # 1xx interim responses are skipped
            self._status = status
            self._eof_body = not self._framed
        self._framed = False

    def on_body(self, body: bytes) -> None:
        if self._status != 200:
            return
        tail = self._tail
        buf = tail + body if tail else body
        end = len(buf)
        if buf.find(b"\n") == end - 2 and buf[-1] == 10:
            # The common case, one single-line event ending the buffer: memchr, no 2-byte search.
            n = 1
            self._tail = b""
        else:
            end = buf.rfind(_SEP)
            if end < 0:
                self._tail = buf
                return
            n = buf.count(_SEP, 0, end) + 1
            end += 2
            self._tail = buf[end:]
        self._done = buf[end - 3] == 93 and buf.endswith(_DONE, 0, end)  # 93: "]"
        st = self._st
        st.events += n
        now, last = self._now, self._last
        self._last = now
        if not self._counted:
            return
        if not self._content and _CONTENT.search(buf, 0, end) is not None:
            self._content = True
            st.ttft.add(now - self.t0)
        if last == now:  # an earlier callback of this same read completed an event
            st.same_read += n
        else:
            st.same_read += n - 1
            if last:  # not the stream's first event
                st.gaps.add(now - last)

    def on_message_complete(self) -> None:
        if self._status:
            self._finish(self._outcome(), keep=self.parser.should_keep_alive())

    # --

    def _outcome(self) -> str | None:
        if self._status != 200:
            return f"http_{self._status}"
        if not self._done or self._tail.strip():
            return "no_done"
        return None

    def _finish(self, outcome: str | None, keep: bool) -> None:
        fut, self._fut = self._fut, None
        if not keep:
            self.alive = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
        if fut is not None and not fut.done():
            fut.set_result(outcome)


class _Target:
    """Where to connect and the request bytes, built once."""

    def __init__(self, url: str, headers: Headers, body: Body) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"need an http(s)://host[:port]/path URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        payload = _body_bytes(body)
        extra = headers.items() if isinstance(headers, Mapping) else (headers or ())
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {parts.netloc.rpartition('@')[2]}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(payload)}",
            *(f"{name}: {value}" for name, value in extra),
        ]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def _body_bytes(body: Body) -> bytes:
    """JSON request bytes; a JSON object without "stream" gets "stream": true."""
    if body is None:
        body = DEFAULT_BODY
    if isinstance(body, bytes | str):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and "stream" not in parsed:
            return json.dumps({**parsed, "stream": True}, separators=(",", ":")).encode()
        return body.encode() if isinstance(body, str) else body
    return json.dumps({"stream": True, **body}, separators=(",", ":")).encode()


class _Runner:
    def __init__(self, target: _Target, stats: _Stats) -> None:
        self.target = target
        self.stats = stats
        self.conns: set[_Conn] = set()
        self.stopping = False
        self.connecting = 0  # workers waiting for a connection right now

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        target = self.target
        self.connecting += 1
        try:
            # Not asyncio.wait_for: on 3.11 it swallows a cancel that races a failed connect.
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self.stats), target.host, target.port, ssl=target.ssl
                )
        finally:
            self.connecting -= 1
        self.stats.connections += 1
        self.conns.add(conn)
        return conn

    async def worker(self, delay: float) -> None:
        """One stream slot: stream after stream, reusing the connection while it lives."""
        await asyncio.sleep(delay)
        st = self.stats
        conn: _Conn | None = None
        while not self.stopping:
            if conn is None or not conn.alive:
                if conn is not None:
                    self.conns.discard(conn)
                counted = st.counting
                try:
                    conn = await self._connect()
                except (OSError, TimeoutError) as exc:
                    conn = None
                    if counted:
                        st.started += 1
                        st.error("connect_timeout" if isinstance(exc, TimeoutError) else "connect")
                    await asyncio.sleep(ERROR_BACKOFF_S)
                    continue
            counted = st.counting
            if counted:
                st.inflight += 1
            outcome = await conn.start(self.target.request, counted)
            if counted:
                st.inflight -= 1
            if outcome == "closed" and conn.streams > 1 and not conn.received:
                st.retries += 1  # the keep-alive race: closed by the server before our request
                continue
            if counted:
                st.started += 1
                if outcome is None:
                    st.completed += 1
                else:
                    st.error(outcome)
            if outcome is not None and not outcome.startswith("http_"):
                await asyncio.sleep(ERROR_BACKOFF_S)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def run(
    url: str,
    streams: int,
    duration: float,
    warmup: float = 2.0,
    headers: Headers = None,
    body: Body = None,
    ramp: float = 1.0,
) -> dict[str, Any]:
    """Keep ``streams`` streamed completions open against ``url``; return the figures.

    The first ``streams`` are started evenly over ``ramp`` seconds; streams started during
    the following ``warmup`` - ``ramp`` seconds are not counted, the window is ``duration``.
    """
    if streams < 1 or duration <= 0:
        raise ValueError("need streams >= 1 and duration > 0")
    _raise_fd_limit(streams + 256)
    target = _Target(url, headers, body)
    stats = _Stats()
    runner = _Runner(target, stats)
    tasks = [asyncio.create_task(runner.worker(i * ramp / streams)) for i in range(streams)]
    try:
        await asyncio.sleep(warmup)
        stats.counting = True
        events0, conns0 = stats.events, stats.connections
        cpu0, t0 = time.process_time(), _perf()
        await asyncio.sleep(duration)
        stats.counting = False
        cpu, now = time.process_time() - cpu0, _perf()
        elapsed = now - t0
        waits, silent = [], 0  # open streams (counted or not): how long since their last event
        for conn in runner.conns:
            wait = conn.waiting_ms(now)
            if wait is not None:
                waits.append(wait)
                silent += not conn.received
        ttft, gaps = stats.ttft, stats.gaps
        t50, t90, t99 = ttft.percentiles_ms((50, 90, 99))
        g50, g90, g99, g999 = gaps.percentiles_ms((50, 90, 99, 99.9))
        events = stats.events - events0
        result: dict[str, Any] = {
            "url": url,
            "streams": streams,
            "duration": round(elapsed, 3),
            "warmup": warmup,
            "ramp": ramp,
            "started": stats.started + stats.inflight,
            "completed": stats.completed,
            "errors": stats.errors,
            "error_kinds": dict(sorted(stats.error_kinds.items())),
            "unfinished": stats.inflight,
            "ttft_ms": {"p50": t50, "p90": t90, "p99": t99, "max": ttft.max_ms(), "n": ttft.n},
            "gap_ms": {
                "p50": g50,
                "p90": g90,
                "p99": g99,
                "p999": g999,
                "max": gaps.max_ms(),
                "n": gaps.n,
                "same_read": stats.same_read,
            },
            "max_stall_ms": gaps.max_ms(),
            "open_streams": len(waits),
            "awaiting_response": silent,
            "connecting": runner.connecting,
            "pending_max_ms": round(max(waits), 3) if waits else None,
            "events": events,
            "events_per_s": round(events / elapsed, 1),
            "connections": stats.connections - conns0,
            "keepalive_retries": stats.retries,
            "cpu_s": round(cpu, 3),
            "cpu_util": round(cpu / elapsed, 3),
            "saturated": cpu / elapsed > SATURATED,
        }
    finally:
        runner.stopping = True
        for task in tasks:
            task.cancel()
        for conn in runner.conns:
            conn.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run under uvloop, print the JSON result."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.streams",
        description="Keep N streamed chat completions open and time their SSE events.",
    )
    parser.add_argument(
        "--url", required=True, help="e.g. http://127.0.0.1:8000/v1/chat/completions"
    )
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to open the streams")
    parser.add_argument(
        "--header", type=_parse_header, action="append", default=[], help="'Name: value'"
    )
    parser.add_argument("--body", help='JSON request body ("stream": true added if absent)')
    args = parser.parse_args(argv)
    if args.warmup < args.ramp:
        print("warning: --warmup < --ramp, the window includes the ramp", file=sys.stderr)
    result = uvloop.run(
        run(args.url, args.streams, args.duration, args.warmup, args.header, args.body, args.ramp)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
