"""One /metrics for several workers (proxy/telemetry/shared.py): snapshots merge exactly, and
a real `tollway serve --workers 2` answers every scrape with the totals of both workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.metrics import OVERFLOW, Counter, Gauge, Histogram, Registry
from proxy.telemetry.prometheus import render
from proxy.telemetry.shared import merge, snapshot
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc, start_mock

KEY = "shared-metrics-key-0123456789abcdef"


def worker(
    requests: int, seconds: float, store_down: int, dropped: int
) -> tuple[Registry, list[Gauge]]:
    registry = Registry()
    c = registry.counter("tollway.requests", "{request}", "r", ("api", "status"))
    c.add(requests, ("chat", 200))
    c.add(1, OVERFLOW)
    h = registry.histogram("gen_ai.client.operation.duration", "s", "d", ("model",), (0.1, 1.0))
    for _ in range(requests):
        h.record(seconds, ("m",))
    gauges = [
        Gauge("tollway.limits.store.unavailable", "", "u", (((), store_down),)),
        Gauge("tollway.telemetry.spans.dropped", "", "d", (((), dropped),), monotonic=True),
    ]
    return registry, gauges


def test_snapshots_merge_counters_histograms_and_gauges() -> None:
    own = worker(3, 0.05, 0, 2)
    other = worker(5, 0.5, 1, 7)
    instruments, gauges = merge(own[0], own[1], [snapshot(*other), b"\x00torn"])
    by_name = {i.name: i for i in instruments}
    requests = by_name["tollway.requests"]
    assert isinstance(requests, Counter)
    assert requests.series == {("chat", 200): 8, OVERFLOW: 2}
    duration = by_name["gen_ai.client.operation.duration"]
    assert isinstance(duration, Histogram)
    (point,) = duration.series.values()
    assert point.counts == [3, 5, 0] and point.count == 8
    assert point.sum == pytest.approx(3 * 0.05 + 5 * 0.5)
    merged = {g.name: g for g in gauges}
    assert merged["tollway.limits.store.unavailable"].points == (((), 1),)  # the largest
    assert merged["tollway.telemetry.spans.dropped"].points == (((), 9),)  # added up
    assert merged["tollway.telemetry.spans.dropped"].monotonic
    text = render(instruments, gauges).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["tollway_telemetry_spans_dropped"].type == "counter"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[MockProc, GatewayProc]]:
    mock = start_mock(tokens=4)
    gateway = start_gateway(f"""
backends: [{{id: mock, url: "{mock.url}"}}]
apis: [{{id: chat, path: /openai, backend: mock}}]
subscriptions: [{{id: team-a, scope: all-apis, primary-key: {KEY}}}]
""", workers=2)  # fmt: skip
    try:
        yield mock, gateway
    finally:
        gateway.stop()
        mock.stop()


def total_requests(gateway: GatewayProc, client: httpx.Client) -> float:
    text = client.get(gateway.base + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families["tollway_requests"].samples
               if s.name == "tollway_requests_total")  # fmt: skip


def test_every_scrape_sees_both_workers(served: tuple[MockProc, GatewayProc]) -> None:
    _, gateway = served
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    n = 40
    # a fresh connection each time, so the kernel spreads requests over both workers
    for _ in range(n):
        with httpx.Client() as client:
            r = client.post(gateway.base + "/openai/chat/completions", json=body,
                            headers={"api-key": KEY})  # fmt: skip
            assert r.status_code == 200
    time.sleep(2.5)  # two snapshot intervals
    seen = []
    for _ in range(12):
        with httpx.Client() as client:
            seen.append(total_requests(gateway, client))
    assert seen == [n] * len(seen)


def test_totals_survive_a_config_reload(served: tuple[MockProc, GatewayProc]) -> None:
    _, gateway = served
    with httpx.Client() as client:
        before = total_requests(gateway, client)
    assert before > 0
    gateway.reload(gateway.config.read_text())  # SIGHUP: each worker swaps its runtime
    deadline = time.monotonic() + 10
    while gateway.log().count("config reloaded") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.log().count("config reloaded") == 2  # both workers
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client() as client:
        r = client.post(gateway.base + "/openai/chat/completions", json=body,
                        headers={"api-key": KEY})  # fmt: skip
        assert r.status_code == 200
    time.sleep(1.5)  # a snapshot interval
    with httpx.Client() as client:
        assert total_requests(gateway, client) == before + 1
