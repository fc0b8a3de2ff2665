"""Circuit-breaker state shared across real gateway processes through a real Redis server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.breaker import Breaker
from proxy.config import CircuitBreaker, loads
from proxy.limits.redis import RedisLimiter
from proxy.sharedbreakers import SharedBreakers, trip_key
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc, free_port
from tests.redisproc import RedisProc

pytestmark = pytest.mark.redis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def config(mock: MockProc, redis_url: str, condition: str) -> str:
    return f"""
gateway: {{store: "{redis_url}"}}
backends:
  - id: shared
    url: {mock.url}
    credentials: {{header: x-member, value: shared}}
    circuit-breaker:
      failure-condition: {{{condition}, interval: 1m, status-code-ranges: [{{min: 500, max: 599}}]}}
      trip-duration: 30s
apis:
  - {{id: chat, path: /openai, backend: shared, subscription-required: false}}
"""


@pytest.fixture
def gateways(mock: MockProc, server: RedisProc, request: pytest.FixtureRequest) -> Iterator[
    tuple[GatewayProc, GatewayProc]
]:  # fmt: skip
    server.client().flushall()
    mock.faults({"faults": {"status": "500"}, "when": {"x-member": "shared"}})
    mock.clear()
    text = config(mock, f"redis://127.0.0.1:{server.port}/0", request.param)
    first = start_gateway(text)
    try:
        second = start_gateway(text)
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()
        mock.faults()


def connection_rule(count: int) -> CircuitBreaker:
    """A breaker rule that counts connection errors, trips for 5 s."""
    rule = (
        loads(f"""
backends:
  - id: b
    url: http://127.0.0.1:{free_port()}/v1
    circuit-breaker: {{failure-condition: {{count: {count}, interval: 1m,
                                            error-reasons: [connection]}}, trip-duration: 5s}}
apis: [{{id: c, path: /o, backend: b}}]
""")
        .backends[0]
        .circuit_breaker
    )
    assert rule is not None
    return rule


def is_open(gw: GatewayProc) -> bool:
    for line in httpx.get(gw.base + "/metrics").text.splitlines():
        if line.startswith("tollway_backend_circuit_breaker_open{"):
            return line.endswith(" 1")
    return False


def wait_open(gw: GatewayProc, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not is_open(gw):
        assert time.monotonic() < deadline, "the trip did not reach this gateway"
        time.sleep(0.05)


def post(gw: GatewayProc) -> int:
    return httpx.post(gw.base + "/openai/chat/completions", json=CHAT).status_code


@pytest.mark.parametrize("gateways", ["count: 4"], indirect=True)
def test_failures_are_counted_across_processes(
    gateways: tuple[GatewayProc, GatewayProc], mock: MockProc
) -> None:
    first, second = gateways
    assert [post(first), post(second), post(first), post(second)] == [500] * 4
    # no process saw 4 failures; together they did
    wait_open(first)
    wait_open(second)
    assert post(first) == 503 and post(second) == 503
    assert len(mock.requests()) == 4


@pytest.mark.parametrize("gateways", ["percentage: 50, min-requests: 2"], indirect=True)
def test_a_trip_in_one_process_reaches_the_others(
    gateways: tuple[GatewayProc, GatewayProc], mock: MockProc
) -> None:
    first, second = gateways
    assert [post(first), post(first)] == [500, 500]  # percentage: counted in `first` alone
    assert is_open(first)
    wait_open(second)  # within the poll interval
    refused = httpx.post(second.base + "/openai/chat/completions", json=CHAT)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "BackendUnavailable"
    assert 25 <= int(refused.headers["retry-after"]) <= 30
    assert len(mock.requests()) == 2


def test_a_store_that_is_away_leaves_breakers_per_process(caplog: pytest.LogCaptureFixture) -> None:
    rule = connection_rule(count=1)

    async def main() -> None:
        store = RedisLimiter.connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        shared = SharedBreakers(store)
        breaker = Breaker("b", rule)
        shared.breakers = {"b": breaker}
        await shared.poll_once()
        assert not shared.available and breaker.state(time.monotonic()) == "closed"
        shared.tripped(breaker, 5.0)
        await shared.close()
        await store.close()

    asyncio.run(main())
    assert "per process while the store is away" in caplog.text


def test_trip_keys_share_a_cluster_slot_per_backend() -> None:
    assert trip_key("gpt-east") == "tollway:{breaker:gpt-east}:trip"


def test_polling_reads_trips_and_absent_keys(server: RedisProc) -> None:
    server.client().flushall()
    rule = connection_rule(count=3)

    async def main() -> None:
        store = RedisLimiter.connect(f"redis://127.0.0.1:{server.port}/0")
        shared = SharedBreakers(store)
        breaker = Breaker("b", rule)
        shared.breakers = {"b": breaker}
        await shared.poll_once()  # no trip anywhere: nothing changes, nothing fails
        assert shared.available and breaker.state(time.monotonic()) == "closed"
        server.client().set(trip_key("b"), "1", px=4000)  # another process tripped it
        await shared.poll_once()
        assert 3.5 < breaker.reopens_in(time.monotonic()) <= 4.0
        await shared.close()
        await store.close()

    asyncio.run(main())
