"""The OTLP/HTTP exporter (proxy/telemetry/export.py): settings from the config and the OTel
environment variables, and delivery to a real HTTP server on loopback that records what it
receives and can answer with errors, close kept-alive connections or hang."""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import pytest

from proxy.telemetry.export import Exporter
from proxy.telemetry.otlpenv import ExportSettings, Target, settings
from proxy.units import retry_after_delay
from tests.mockproc import free_port

LOG = logging.getLogger("tests.export")

# --- settings -------------------------------------------------------------------------------

BASE = "http://collector:4318"


@pytest.mark.parametrize(
    ("endpoint", "env", "traces", "metrics"),
    [
        ("http://c:4318", {}, "http://c:4318/v1/traces", "http://c:4318/v1/metrics"),
        ("https://c/otlp/", {}, "https://c/otlp/v1/traces", "https://c/otlp/v1/metrics"),
        (
            "",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:4318"},
            "http://e:4318/v1/traces",
            "http://e:4318/v1/metrics",
        ),
        (
            "http://c:4318",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:4318/p"},
            "http://e:4318/p/v1/traces",
            "http://e:4318/p/v1/metrics",
        ),
        (
            "http://c:4318",
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x/spans"},
            "http://t:1/x/spans",
            "http://c:4318/v1/metrics",
        ),
        ("", {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:1"}, "", "http://m:1/"),
        ("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t?tenant=a"}, "http://t/?tenant=a", ""),
        (
            "",
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://e",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/v1/metrics",
            },
            "http://e/v1/traces",
            "http://m/v1/metrics",
        ),
        (
            "http://c:4318",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "},
            "http://c:4318/v1/traces",
            "http://c:4318/v1/metrics",
        ),
        ("http://c:4318", {"OTEL_TRACES_EXPORTER": "none"}, "", "http://c:4318/v1/metrics"),
        ("http://c:4318", {"OTEL_METRICS_EXPORTER": "prometheus"}, "http://c:4318/v1/traces", ""),
        (
            "http://c:4318",
            {"OTEL_TRACES_EXPORTER": "console, otlp"},
            "http://c:4318/v1/traces",
            "http://c:4318/v1/metrics",
        ),
        (
            "http://c:4318",
            {"OTEL_SDK_DISABLED": "false"},
            "http://c:4318/v1/traces",
            "http://c:4318/v1/metrics",
        ),
    ],
)
def test_settings_endpoints(endpoint: str, env: dict[str, str], traces: str, metrics: str) -> None:
    resolved = settings(endpoint, env)
    assert resolved is not None
    assert (resolved.traces.url, resolved.metrics.url) == (traces, metrics)


@pytest.mark.parametrize(
    ("endpoint", "env"),
    [
        ("", {}),
        ("", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}),  # nothing exported: nothing to reject
        (BASE, {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}),
        (BASE, {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e", "OTEL_SDK_DISABLED": "true"}),
    ],
)
def test_settings_nothing_to_export(endpoint: str, env: dict[str, str]) -> None:
    assert settings(endpoint, env) is None


def test_settings_defaults() -> None:
    resolved = settings(BASE, {})
    assert resolved == ExportSettings(
        traces=Target(f"{BASE}/v1/traces", (), 10.0, "gzip"),
        metrics=Target(f"{BASE}/v1/metrics", (), 10.0, "gzip"),
        schedule_delay=5.0,
        max_queue=2048,
        max_batch=512,
        metric_interval=60.0,
    )


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cr3t"},
            (("api-key", "s3cr3t"),),
            (("api-key", "s3cr3t"),),
        ),
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": " Authorization = Basic%20dXNlcjpwdw==, X-Team=a%2Cb ,"},
            (("authorization", "Basic dXNlcjpwdw=="), ("x-team", "a,b")),
            (("authorization", "Basic dXNlcjpwdw=="), ("x-team", "a,b")),
        ),
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": "a=1", "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "b=2"},
            (("a", "1"),),
            (("b", "2"),),
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-dataset=spans"}, (("x-dataset", "spans"),), ()),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "k="}, (("k", ""),), (("k", ""),)),
    ],
)
def test_settings_headers(
    env: dict[str, str], traces: tuple[Any, ...], metrics: tuple[Any, ...]
) -> None:
    resolved = settings(BASE, env)
    assert resolved is not None
    assert (resolved.traces.headers, resolved.metrics.headers) == (traces, metrics)


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, (2.5, "gzip"), (2.5, "gzip")),
        (
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "500"},
            (2.5, "gzip"),
            (0.5, "gzip"),
        ),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "none"}, (10.0, "none"), (10.0, "none")),
        (
            {
                "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "GZIP",
            },
            (10.0, "gzip"),
            (10.0, "none"),
        ),
    ],
)
def test_settings_timeout_and_compression(
    env: dict[str, str], traces: tuple[float, str], metrics: tuple[float, str]
) -> None:
    resolved = settings(BASE, env)
    assert resolved is not None
    assert (resolved.traces.timeout, resolved.traces.compression) == traces
    assert (resolved.metrics.timeout, resolved.metrics.compression) == metrics


def test_settings_batching_and_tls() -> None:
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem",
        "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": "/etc/metrics-ca.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/etc/me.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/etc/me.key",
    }
    resolved = settings(BASE, env)
    assert resolved is not None
    assert resolved[2:] == (0.25, 100, 10, 15.0)
    assert resolved.traces[4:] == ("/etc/ca.pem", "/etc/me.pem", "/etc/me.key")
    assert resolved.metrics[4:] == ("/etc/metrics-ca.pem", "/etc/me.pem", "/etc/me.key")


@pytest.mark.parametrize(
    ("endpoint", "env", "message"),
    [
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported (only 'http/protobuf' is)",
        ),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: 'http/json' is not supported",
        ),
        (
            "",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
            "OTEL_EXPORTER_OTLP_ENDPOINT: 'collector:4318' is not an http(s) URL",
        ),
        (
            "",
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:99999/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://c:99999/v1/traces' is not",
        ),
        ("ftp://c", {}, "telemetry.otlp-endpoint: 'ftp://c' is not an http(s) URL"),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"},
            "OTEL_EXPORTER_OTLP_HEADERS: 'novalue' is not a valid name=value header",
        ),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=x%0D%0Ab: injected"},
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS: 'a=x%0D%0Ab: injected' is not a valid",
        ),
        (BASE, {"OTEL_EXPORTER_OTLP_HEADERS": "bad key=1"}, "is not a valid name=value header"),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_HEADERS": "Content-Length=3"},
            "OTEL_EXPORTER_OTLP_HEADERS: content-length is set by the exporter",
        ),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"},
            "OTEL_EXPORTER_OTLP_TIMEOUT: '10s' is not a positive number of milliseconds",
        ),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"},
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: '0' is not a positive",
        ),
        (
            BASE,
            {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
            "OTEL_EXPORTER_OTLP_COMPRESSION: 'zstd' is not gzip or none",
        ),
        (
            BASE,
            {"OTEL_BSP_MAX_QUEUE_SIZE": "-1"},
            "OTEL_BSP_MAX_QUEUE_SIZE: '-1' is not a positive integer",
        ),
        (
            BASE,
            {"OTEL_BSP_MAX_QUEUE_SIZE": "10"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512) is larger than OTEL_BSP_MAX_QUEUE_SIZE (10)",
        ),
        (
            BASE,
            {"OTEL_BSP_SCHEDULE_DELAY": "nan"},
            "OTEL_BSP_SCHEDULE_DELAY: 'nan' is not a positive number",
        ),
    ],
)
def test_settings_errors(endpoint: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        settings(endpoint, env)
    assert message in str(info.value)


# --- a fake OTLP/HTTP collector -------------------------------------------------------------


class Request(NamedTuple):
    at: float
    method: str
    path: str
    headers: dict[str, str]  # lowercased names
    body: bytes  # gunzipped


class Collector:
    """A ThreadingHTTPServer that records each request; `answers` holds the next responses
    as (status, headers) (200 when empty); `hang` makes it never answer; `drop_idle` makes it
    close each connection after answering, without saying so."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answers: deque[tuple[int, dict[str, str]]] = deque()
        self.hang = False
        self.drop_idle = False
        self.release = threading.Event()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                collector.requests.append(
                    Request(time.monotonic(), self.command, self.path, headers, body)
                )
                if collector.hang:
                    collector.release.wait(10)
                    self.close_connection = True
                    return
                status, extra = collector.answers.popleft() if collector.answers else (200, {})
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = collector.drop_idle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def posts(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def spans(self) -> list[list[bytes]]:
        """The span batches received, each as its list of records."""
        return [r.body.split(b",") for r in self.posts("/v1/traces")]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def encode(records: list[bytes]) -> bytes:
    return b",".join(records)


Make = Callable[..., "Exporter[bytes]"]


@pytest.fixture
def make(collector: Collector) -> Iterator[Make]:
    """Build an Exporter for the collector; `traces`/`metrics` replace Target fields."""
    made: list[Exporter[bytes]] = []

    def build(
        *,
        traces: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        encode_spans: Callable[[list[bytes]], bytes] = encode,
        encode_metrics: Callable[[], bytes] | None = None,
        start: bool = True,
        **batching: Any,
    ) -> Exporter[bytes]:
        base = Target("", (("authorization", "Bearer t0k3n"),), timeout=2.0)
        options = ExportSettings(
            traces=base._replace(**{"url": f"{collector.url}/v1/traces", **(traces or {})}),
            metrics=base._replace(**{"url": f"{collector.url}/v1/metrics", **(metrics or {})}),
            schedule_delay=0.05,
            max_queue=100,
            max_batch=10,
            metric_interval=60.0,
        )._replace(**batching)
        exporter = Exporter(options, encode_spans, encode_metrics, LOG)
        made.append(exporter)
        if start:
            exporter.start()
        return exporter

    yield build
    for exporter in made:
        exporter.shutdown(5.0)


# --- delivery -------------------------------------------------------------------------------


def test_spans_batched_to_traces_with_headers_and_gzip(collector: Collector, make: Make) -> None:
    exporter = make()
    for i in range(5):
        exporter.submit(b"span-%d" % i)
    wait_for(lambda: exporter.exported_spans == 5)
    (request,) = collector.requests
    assert (request.method, request.path) == ("POST", "/v1/traces")
    assert request.headers["content-type"] == "application/x-protobuf"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["user-agent"] == "tollway"
    assert request.headers["authorization"] == "Bearer t0k3n"
    assert request.body == b"span-0,span-1,span-2,span-3,span-4"
    assert (exporter.failed_exports, exporter.dropped_spans) == (0, 0)


def test_uncompressed(collector: Collector, make: Make) -> None:
    exporter = make(traces={"compression": "none"})
    exporter.submit(b"plain")
    wait_for(lambda: exporter.exported_spans == 1)
    assert "content-encoding" not in collector.requests[0].headers
    assert collector.requests[0].body == b"plain"


def test_max_batch_respected(collector: Collector, make: Make) -> None:
    exporter = make(max_batch=3, start=False)
    for i in range(10):
        exporter.submit(b"%d" % i)
    exporter.start()
    wait_for(lambda: exporter.exported_spans == 10)
    assert [len(batch) for batch in collector.spans()] == [3, 3, 3, 1]
    assert [r for batch in collector.spans() for r in batch] == [b"%d" % i for i in range(10)]


def test_full_batch_sent_before_the_delay(collector: Collector, make: Make) -> None:
    exporter = make(schedule_delay=30.0, max_batch=4)
    time.sleep(0.05)  # the thread is waiting
    for i in range(6):
        exporter.submit(b"%d" % i)
    wait_for(lambda: exporter.exported_spans == 4, timeout=2.0)
    assert collector.spans() == [[b"0", b"1", b"2", b"3"]]


def test_queue_full_drops_and_counts(make: Make) -> None:
    exporter = make(max_queue=5, max_batch=5, start=False)
    for i in range(8):
        exporter.submit(b"%d" % i)
    assert exporter.dropped_spans == 3


def test_collector_down_counts_failures_and_submit_stays_instant(make: Make) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    exporter = make(traces={"url": dead, "timeout": 0.5}, max_queue=1000, max_batch=100)
    start = time.perf_counter()
    for i in range(20_000):
        exporter.submit(b"%d" % i)
    per_call = (time.perf_counter() - start) / 20_000
    wait_for(lambda: exporter.failed_exports >= 1)
    assert per_call < 20e-6
    assert "ConnectionRefusedError" in exporter.last_error
    exporter.shutdown()
    assert exporter.dropped_spans > 10_000  # the queue was full most of the time
    assert exporter.dropped_spans + exporter.failed_spans == 20_000  # every record counted once
    assert exporter.exported_spans == 0


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_status_retried_then_delivered(
    collector: Collector, make: Make, status: int
) -> None:
    collector.answers.append((status, {"Retry-After": "0"}))
    exporter = make()
    exporter.submit(b"again")
    wait_for(lambda: exporter.exported_spans == 1)
    assert [r.body for r in collector.requests] == [b"again", b"again"]
    assert exporter.failed_exports == 0


def test_retry_after_honoured(collector: Collector, make: Make) -> None:
    collector.answers.append((503, {"Retry-After": "1"}))
    exporter = make(traces={"timeout": 3.0})
    exporter.submit(b"later")
    wait_for(lambda: exporter.exported_spans == 1)
    first, second = collector.requests
    assert 0.95 <= second.at - first.at < 1.5


def test_backoff_without_retry_after(collector: Collector, make: Make) -> None:
    collector.answers.append((502, {}))
    exporter = make(traces={"timeout": 3.0})
    exporter.submit(b"later")
    wait_for(lambda: exporter.exported_spans == 1)
    first, second = collector.requests
    assert 0.75 <= second.at - first.at < 1.5  # 1 s with +-20 % jitter


def test_three_attempts_at_most(collector: Collector, make: Make) -> None:
    collector.answers.extend([(503, {"Retry-After": "0"})] * 5)
    exporter = make()
    exporter.submit(b"x")
    wait_for(lambda: exporter.failed_exports == 1)
    assert len(collector.requests) == 3
    assert exporter.last_error == "exporting 1 spans failed, dropped: HTTP 503 Service Unavailable"


def test_retry_after_beyond_the_timeout_drops_at_once(collector: Collector, make: Make) -> None:
    collector.answers.append((429, {"Retry-After": "30"}))
    exporter = make(traces={"timeout": 1.0})
    start = time.monotonic()
    exporter.submit(b"x")
    wait_for(lambda: exporter.failed_exports == 1)
    assert time.monotonic() - start < 0.5
    assert len(collector.requests) == 1


def test_client_error_dropped_counted_and_logged_once(
    collector: Collector, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    collector.answers.extend([(400, {}), (400, {})])
    exporter = make()
    exporter.submit(b"a")
    wait_for(lambda: exporter.failed_exports == 1)
    exporter.submit(b"b")
    wait_for(lambda: exporter.failed_exports == 2)
    assert len(collector.requests) == 2  # not retried
    assert exporter.failed_spans == 2
    assert exporter.exported_spans == 0
    warnings = [r for r in caplog.records if r.name == LOG.name]
    assert [r.getMessage() for r in warnings] == [
        "OTLP export: exporting 1 spans failed, dropped: HTTP 400 Bad Request"
    ]
    exporter.submit(b"c")  # the collector recovers
    wait_for(lambda: exporter.exported_spans == 1)


def test_hanging_collector_timeout_and_shutdown(collector: Collector, make: Make) -> None:
    collector.hang = True
    exporter = make(traces={"timeout": 0.3})
    start = time.monotonic()
    exporter.submit(b"stuck")
    wait_for(lambda: exporter.failed_exports == 1, timeout=2.0)
    assert 0.3 <= time.monotonic() - start < 1.0
    assert "TimeoutError" in exporter.last_error
    for i in range(30):
        exporter.submit(b"%d" % i)
    start = time.monotonic()
    exporter.shutdown(timeout=0.5)
    assert time.monotonic() - start < 0.7


def test_metrics_posted_on_the_interval(collector: Collector, make: Make) -> None:
    count = iter(range(1000))
    exporter = make(encode_metrics=lambda: b"metrics-%d" % next(count), metric_interval=0.1)
    wait_for(lambda: exporter.exported_metrics >= 3)
    posts = collector.posts("/v1/metrics")
    assert [p.body for p in posts[:3]] == [b"metrics-0", b"metrics-1", b"metrics-2"]
    assert 0.08 <= posts[1].at - posts[0].at < 0.5
    assert posts[0].headers["content-type"] == "application/x-protobuf"
    assert posts[0].headers["authorization"] == "Bearer t0k3n"


def test_empty_metrics_not_posted(collector: Collector, make: Make) -> None:
    exporter = make(encode_metrics=lambda: b"", metric_interval=0.02)
    time.sleep(0.1)
    exporter.shutdown()
    assert collector.posts("/v1/metrics") == []


def test_shutdown_flushes_spans_and_metrics(collector: Collector, make: Make) -> None:
    exporter = make(encode_metrics=lambda: b"final", schedule_delay=30.0, max_batch=4)
    for i in range(7):
        exporter.submit(b"%d" % i)
    wait_for(lambda: exporter.exported_spans == 4)  # one full batch went at once
    start = time.monotonic()
    exporter.shutdown(timeout=2.0)
    assert time.monotonic() - start < 0.5
    assert collector.spans() == [[b"0", b"1", b"2", b"3"], [b"4", b"5", b"6"]]
    assert [p.body for p in collector.posts("/v1/metrics")] == [b"final"]
    exporter.shutdown()  # idempotent
    assert len(collector.requests) == 3


def test_shutdown_before_start_returns(make: Make) -> None:
    exporter = make(start=False)
    exporter.submit(b"x")
    exporter.shutdown(timeout=0.1)
    exporter.shutdown(timeout=0.1)


def test_encoding_error_drops_the_batch_and_the_thread_goes_on(
    collector: Collector, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    def fragile(records: list[bytes]) -> bytes:
        if b"poison" in records:
            raise RuntimeError("cannot encode")
        return encode(records)

    exporter = make(encode_spans=fragile)
    exporter.submit(b"poison")
    wait_for(lambda: exporter.failed_exports == 1)
    assert exporter.last_error == "encoding 1 spans failed: RuntimeError('cannot encode')"
    assert any(r.exc_info for r in caplog.records if r.name == LOG.name)
    exporter.submit(b"fine")
    wait_for(lambda: exporter.exported_spans == 1)
    assert collector.spans() == [[b"fine"]]


def test_metrics_encoding_error_counted(collector: Collector, make: Make) -> None:
    def broken() -> bytes:
        raise ValueError("registry changed")

    exporter = make(encode_metrics=broken, metric_interval=0.05)
    wait_for(lambda: exporter.failed_exports >= 2)
    exporter.submit(b"still")
    wait_for(lambda: exporter.exported_spans == 1)
    assert "registry changed" in exporter.last_error


def test_kept_alive_connection_closed_by_collector_is_replaced(
    collector: Collector, make: Make
) -> None:
    exporter = make(traces={"timeout": 0.5})
    exporter.submit(b"one")
    wait_for(lambda: exporter.exported_spans == 1)
    collector.drop_idle = True
    exporter.submit(b"two")
    wait_for(lambda: exporter.exported_spans == 2)
    time.sleep(0.05)  # the collector has closed the connection
    exporter.submit(b"three")
    wait_for(lambda: exporter.exported_spans == 3)
    assert exporter.failed_exports == 0
    assert collector.spans() == [[b"one"], [b"two"], [b"three"]]


def test_traces_off_discards_spans(collector: Collector, make: Make) -> None:
    exporter = make(traces={"url": ""}, encode_metrics=lambda: b"m", metric_interval=0.05)
    for i in range(30):
        exporter.submit(b"%d" % i)
    wait_for(lambda: exporter.exported_metrics >= 1)
    wait_for(lambda: exporter.dropped_spans == 0 and not collector.posts("/v1/traces"))
    assert exporter.exported_spans == 0


def test_restart_after_shutdown_starts_afresh(collector: Collector, make: Make) -> None:
    exporter = make()
    exporter.submit(b"first")
    exporter.shutdown()
    assert exporter.exported_spans == 1
    exporter.start()  # as in a forked worker of a process that exported: its own state
    assert exporter.exported_spans == 0
    exporter.submit(b"second")
    wait_for(lambda: exporter.exported_spans == 1)
    assert collector.spans() == [[b"first"], [b"second"]]


def test_missing_ca_file_fails_at_construction(make: Make) -> None:
    https = {"url": "https://127.0.0.1:1/v1/traces", "certificate": "/nonexistent/ca.pem"}
    with pytest.raises(FileNotFoundError):
        make(traces=https, start=False)


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("3", 3.0, 3.0),
        (" 0 ", 0.0, 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, 0.0),  # in the past
        ("soon", None, None),
        ("-1", None, None),
        (None, None, None),
    ],
)
def test_retry_after_values(value: str | None, low: float | None, high: float | None) -> None:
    delay = retry_after_delay(value)
    if low is None:
        assert delay is None
    else:
        assert delay is not None and low <= delay <= (high or 0)


def test_retry_after_http_date_in_the_future() -> None:
    delay = retry_after_delay(formatdate(time.time() + 30, usegmt=True))
    assert delay is not None and 28 <= delay <= 31
