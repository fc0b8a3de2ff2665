"""store-failure-mode (SPEC §3, §6): the gateway with a Redis store that goes away and returns.

A real valkey-server (tests/redisproc.py) is killed and restarted on the same port under a
gateway running in-process in front of the real mock backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import config as config_module
from proxy.app import Gateway
from proxy.limits.base import Limit, Reservation
from proxy.limits.failover import FailoverLimiter
from proxy.limits.lease import SWEEP_EVERY
from proxy.limits.redis import RedisLimiter
from tests.inprocess import run_app
from tests.mockproc import MockProc, start_mock
from tests.redisproc import RedisProc

pytestmark = pytest.mark.redis

KEY = "store-failure-key-0123456789abcdef"
HEADERS = {"api-key": KEY}
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProc]:
    proc = start_mock(tokens=4)
    yield proc
    proc.stop()


def make_config(mock_url: str, store: str, mode: str) -> config_module.Config:
    return config_module.loads(f"""
gateway: {{store: "{store}", store-failure-mode: {mode}}}
backends: [{{id: mock, url: "{mock_url}"}}]
apis:
  - id: chat
    path: /openai
    backend: mock
    policies:
      - llm-token-limit: {{counter-key: "{{subscription.id}}", tokens-per-minute: 100000}}
subscriptions: [{{id: team-a, scope: all-apis, primary-key: {KEY}}}]
""")


async def post(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/openai/chat/completions", json=BODY, headers=HEADERS)


async def store_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The store's health as /metrics shows it (the metric a dashboard alerts on)."""
    text = (await client.get("/metrics")).text
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("tollway_limits_store_")
    }


def limiter_of(app: Gateway) -> FailoverLimiter:
    limiter = app.failover  # under the per-process leases (proxy/limits/lease.py)
    assert isinstance(limiter, FailoverLimiter)
    return limiter


def test_open_mode_serves_on_local_counters_and_recovers(
    mock: MockProc, own_server: RedisProc, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        limiter = limiter_of(app)
        limiter._retry_interval = 0.0  # try the store on every request: no sleeping in tests
        assert (await post(client)).status_code == 200
        shared, _ = await limiter.store.usage(Limit("team-a", 100000, None))
        assert shared > 0  # counted in Redis

        own_server.kill()
        with caplog.at_level(logging.ERROR, logger="tollway"):
            outage = [await post(client) for _ in range(3)]
        assert [r.status_code for r in outage] == [200, 200, 200]  # nothing lost
        assert limiter.degraded and limiter.fallback_admissions == 3
        assert "token-limit store unavailable" in caplog.text
        local, _ = await limiter.fallback.usage(Limit("team-a", 100000, None))
        assert local > 0  # counted per process while Redis was away
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (200, "degraded")
        metrics = await store_metrics(client)
        assert metrics["tollway_limits_store_unavailable"] == 1
        assert metrics["tollway_limits_store_failed_admissions_total"] == 3

        own_server.start()  # back on the same port: no restart of the gateway
        assert (await post(client)).status_code == 200
        assert not limiter.degraded
        assert (await client.get("/readyz")).json()["status"] == "ready"
        assert (await store_metrics(client))["tollway_limits_store_unavailable"] == 0
        after, _ = await limiter.store.usage(Limit("team-a", 100000, None))
        assert after > 0  # shared counting resumed (the old counts were lost with the server)

    run_app(make_config(mock.url, own_server.url, "open"), scenario)


def test_closed_mode_refuses_with_503_and_recovers(mock: MockProc, own_server: RedisProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        limiter = limiter_of(app)
        limiter._retry_interval = 0.0
        assert (await post(client)).status_code == 200
        own_server.kill()
        seen = len(mock.requests())
        refused = await post(client)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "StoreUnavailable"
        assert len(mock.requests()) == seen  # refused before the backend was called
        assert (await client.get("/readyz")).status_code == 503
        own_server.start()
        assert (await post(client)).status_code == 200
        assert (await client.get("/readyz")).status_code == 200

    run_app(make_config(mock.url, own_server.url, "closed"), scenario)


def test_a_retry_interval_spares_a_dead_store(mock: MockProc, own_server: RedisProc) -> None:
    """While degraded, the store is tried at most once per interval, not on every request."""

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        limiter = limiter_of(app)
        calls = 0
        original = limiter.store.admit_for

        async def counting(*args: object) -> object:
            nonlocal calls
            calls += 1
            return await original(*args)  # type: ignore[arg-type]

        limiter.store.admit_for = counting  # type: ignore[method-assign]
        own_server.kill()
        for _ in range(5):
            assert (await post(client)).status_code == 200
        assert calls == 1  # the first failure starts a 1-s quiet interval

    run_app(make_config(mock.url, own_server.url, "open"), scenario)


@pytest.mark.parametrize("how", ["awaited", "soon"])
def test_settlements_missed_during_an_outage_are_replayed(own_server: RedisProc, how: str) -> None:
    """A request admitted on Redis whose settlement meets a hung server: the settlement is
    kept and applied once the server answers, so no reservation is left behind. The same for
    the settlement the handler sends without awaiting it (`settle_soon`). The server may have
    run the settlement when it resumed (it was in its socket): the replay then changes
    nothing, where applying it twice would give 380 tokens back twice."""

    async def main() -> None:
        limiter = FailoverLimiter(RedisLimiter.connect(own_server.url), "open", retry_interval=0.0)
        limit = Limit("team-a", 10_000, 50_000, "daily")
        try:
            admitted = await limiter.admit(limit, 500)
            assert isinstance(admitted, Reservation)
            own_server.pause()  # hung, not gone: the reservation stays in the server
            try:
                if how == "awaited":
                    assert await limiter.settle(admitted, 120) == (None, None)
                else:
                    limiter.settle_soon(admitted, 120)
                    assert not limiter.degraded
                    while not limiter.degraded:  # the store's timeout tells the limiter
                        await asyncio.sleep(0.05)
            finally:
                own_server.resume()
            # run from the socket when the server resumed, or lost with the connection
            assert await limiter.store.usage(limit) in ((120, 120), (500, 500))
            again = await limiter.admit(limit, 1)  # the store answers: replay, then this
            assert isinstance(again, Reservation)
            assert await limiter.store.usage(limit) == (121, 121)
        finally:
            await limiter.close()

    asyncio.run(main())


def test_an_outage_mid_load_loses_no_request_and_no_settlement(
    mock: MockProc, own_server: RedisProc
) -> None:
    """Requests in flight while Redis hangs and comes back: every one is answered, and every
    reservation ends as exactly its usage, in Redis or in the per-process fallback."""

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        limiter = limiter_of(app)
        limiter._retry_interval = 0.2
        slow = {**HEADERS, "x-mock-delay-ms": "400"}

        async def one(delay: float) -> httpx.Response:
            await asyncio.sleep(delay)
            return await client.post("/openai/chat/completions", json=BODY, headers=slow)

        first = [asyncio.ensure_future(one(0)) for _ in range(30)]  # admitted on Redis
        await asyncio.sleep(0.15)
        own_server.pause()  # their settlements (at ~0.4 s) meet a hung store
        second = [asyncio.ensure_future(one(0.05 * i)) for i in range(20)]  # admitted meanwhile
        await asyncio.sleep(1.2)
        own_server.resume()
        replies = await asyncio.gather(*first, *second)
        assert [r.status_code for r in replies] == [200] * 50  # nothing lost
        last = await post(client)  # the store answers again: missed settlements are replayed
        assert last.status_code == 200
        await asyncio.sleep(1 + 2 * SWEEP_EVERY)  # open leases give back what was not drawn
        charged = sum(r.json()["usage"]["total_tokens"] for r in [*replies, last])
        limit = Limit("team-a", 100000, None)
        in_redis, _ = await limiter.store.usage(limit)
        in_process, _ = await limiter.fallback.usage(limit)
        assert not limiter._pending  # every settlement the hung store missed was replayed
        # Nothing is under-counted. An admission that timed out may have run when the server
        # resumed (it was in the server's socket buffer): at most what it asked for (a lease
        # asks for more than its request's 18 tokens, the estimated prompt and max_tokens).
        surplus = in_redis + in_process - charged
        assert 0 <= surplus <= limiter.failed_tokens

    run_app(make_config(mock.url, own_server.url, "open"), scenario)
