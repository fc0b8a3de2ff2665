"""Fault storms against a real `tollway serve`, a real mock backend and a real Redis.

Each storm runs many concurrent requests through a pool whose members fail in the ways
backends do (5xx bursts, 429 with Retry-After, a dead port, a hang, connections reset
mid-stream, clients that leave) and then checks that nothing was lost:

- every request got an HTTP answer;
- every token reservation was settled: the shared Redis window holds exactly what the
  replies say they cost (a reservation left behind would add its `max_tokens`);
- the gateway's asyncio tasks and its sockets not held by a backend connection pool come
  back to where they were before the storm.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import psutil
import pytest

from proxy.limits.lease import SWEEP_EVERY
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc, free_port, start_mock
from tests.redisproc import RedisProc

pytestmark = pytest.mark.redis

KEY = "storm-key-0123456789abcdef"
LIMIT = """
    policies:
      - llm-token-limit:
          counter-key: storm
          tokens-per-minute: 100000000
          estimate-prompt-tokens: true
          reserve-completion-tokens: true
"""


def storm_config(mock: MockProc, redis: RedisProc, read_timeout: str = "2s") -> str:
    def member(name: str, url: str, breaker: str) -> str:
        return (
            f"  - {{id: {name}, url: '{url}', credentials: {{header: x-member, value: {name}}},"
            f" timeout: {{connect: 1s, read: {read_timeout}}}, circuit-breaker: {breaker}}}\n"
        )

    breaker = (
        "{failure-condition: {count: 5, interval: 10s, status-code-ranges: [{min: 500, max: 599}],"
        " error-reasons: [connection, timeout]}, trip-duration: 500ms}"
    )
    dead = f"http://127.0.0.1:{free_port()}/v1"
    return (
        f'gateway: {{store: "redis://127.0.0.1:{redis.port}/0"}}\n'
        "telemetry: {access-log: off}\n"
        "backends:\n"
        + member("a", mock.url, breaker)
        + member("b", mock.url, breaker)
        + member("c", dead, breaker)
        + "  - {id: pool, type: pool, services: [{id: a}, {id: b}, {id: c}],"
        " retry: {count: 3, max-retry-after: 1s}}\n"
        "apis:\n"
        "  - id: chat\n    path: /openai\n    backend: pool\n" + LIMIT
        + f"subscriptions:\n  - {{id: storm, scope: all-apis, primary-key: {KEY}}}\n"
    )  # fmt: skip


@pytest.fixture
def storm_redis(server: RedisProc) -> RedisProc:
    server.client().flushall()
    return server


def window_total(redis: RedisProc) -> int:
    client = redis.client()
    total = 0
    for key in client.scan_iter("tollway:{storm}:rate"):
        total += sum(int(v) for v in client.hgetall(key).values())
    return total


def flush_after_leases(redis: RedisProc) -> None:
    """Empty Redis once the warm-up's leases have closed: a lease still open would be drawn on
    after the flush, for tokens Redis no longer holds (as after a restart without data)."""
    time.sleep(1 + 2 * SWEEP_EVERY)
    redis.client().flushall()


def closed_window_total(redis: RedisProc) -> int:
    """`window_total` once the gateway's leases of the last second have closed and given back
    what they did not draw (proxy/limits/lease.py)."""
    time.sleep(1 + 2 * SWEEP_EVERY)
    return window_total(redis)


def gauges(gw: GatewayProc) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(gw.base + "/metrics").text.splitlines():
        for name in ("tollway_process_tasks", "tollway_backend_connections"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return out


def untracked_sockets(gw: GatewayProc) -> int:
    """The gateway's TCP sockets minus its backend connections (listening ones included)."""
    procs = [psutil.Process(gw.proc.pid), *psutil.Process(gw.proc.pid).children(recursive=True)]
    sockets = sum(len(p.net_connections(kind="tcp")) for p in procs)
    return sockets - int(gauges(gw).get("tollway_backend_connections", 0))


def settled(gw: GatewayProc, baseline: tuple[float, int], seconds: float = 10.0) -> None:
    """Wait until tasks and untracked sockets are back at `baseline`; fail if they are not."""
    deadline = time.monotonic() + seconds
    while True:
        now = (gauges(gw)["tollway_process_tasks"], untracked_sockets(gw))
        if now[0] <= baseline[0] and now[1] <= baseline[1]:
            return
        assert time.monotonic() < deadline, f"tasks/sockets {now} stayed above {baseline}"
        time.sleep(0.1)


async def chat(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
    """One request; (status, tokens its reply says it cost: 0 for errors)."""
    stream = i % 2 == 0
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"storm {i}"}],
        "max_tokens": 5000,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    reply = await client.post("/openai/chat/completions", json=body)
    if reply.status_code != 200:
        assert reply.json()["error"]["message"]
        return reply.status_code, 0
    if not stream:
        return 200, reply.json()["usage"]["total_tokens"]
    events = [e.removeprefix("data: ") for e in reply.text.split("\n\n") if e.startswith("data: {")]
    last = json.loads(events[-1])
    assert "error" not in last, last
    return 200, last["usage"]["total_tokens"]


async def storm(gw: GatewayProc, count: int, concurrency: int) -> list[tuple[int, int]]:
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"api-key": KEY}
    async with httpx.AsyncClient(
        base_url=gw.base, limits=limits, headers=headers, timeout=30
    ) as client:
        return await asyncio.gather(*(chat(client, i) for i in range(count)))


def test_a_storm_of_backend_faults_loses_nothing(faulty: MockProc, storm_redis: RedisProc) -> None:
    gw = start_gateway(storm_config(faulty, storm_redis))
    try:
        asyncio.run(storm(gw, 40, 40))  # warm: connections made, breakers closed
        flush_after_leases(storm_redis)
        baseline = (gauges(gw)["tollway_process_tasks"], untracked_sockets(gw))
        faulty.faults(
            {"faults": {"status": "500"}, "when": {"x-member": "a"}, "times": 60},
            {"faults": {"status": "429", "retry-after": "1"}, "when": {"x-member": "b"}, "times": 30},
            {"faults": {"status": "503"}, "when": {"x-member": "b"}, "times": 10},
        )  # fmt: skip
        results = asyncio.run(storm(gw, 300, 100))
        statuses = {s for s, _ in results}
        assert statuses <= {200, 429, 500, 502, 503}, statuses
        assert sum(s == 200 for s, _ in results) >= 200  # retries and the pool hide most faults
        assert closed_window_total(storm_redis) == sum(tokens for _, tokens in results)
        settled(gw, baseline)
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()


def test_a_hung_backend_times_out_and_leaves_nothing(
    faulty: MockProc, storm_redis: RedisProc
) -> None:
    gw = start_gateway(storm_config(faulty, storm_redis, read_timeout="300ms"))
    try:
        asyncio.run(storm(gw, 20, 20))
        flush_after_leases(storm_redis)
        baseline = (gauges(gw)["tollway_process_tasks"], untracked_sockets(gw))
        faulty.faults({"faults": {"delay-ms": "2000"}, "when": {"x-member": "a"}, "times": 20})
        results = asyncio.run(storm(gw, 60, 30))
        assert {s for s, _ in results} <= {200, 503, 504}
        assert any(s == 504 for s, _ in results)  # read timeouts are not retried
        # a timed-out request is charged its prompt (the backend may have worked on it);
        # a reservation left behind would add 5000 completion tokens
        timed_out = sum(s == 504 for s, _ in results)
        charged = closed_window_total(storm_redis) - sum(t for _, t in results)
        assert 0 <= charged <= timed_out * 50
        settled(gw, baseline)
    finally:
        gw.stop()


async def leave_mid_stream(gw: GatewayProc, i: int) -> None:
    """Start a streamed request and go away after its first event."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"bye {i}"}],
            "max_tokens": 5000, "stream": True}  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=gw.base, headers={"api-key": KEY}, timeout=30) as client,
        client.stream("POST", "/openai/chat/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        async for _ in reply.aiter_raw():
            break  # closing the client drops the connection


def test_a_storm_of_client_disconnects_leaves_nothing(
    paced_mock: MockProc, storm_redis: RedisProc
) -> None:
    gw = start_gateway(storm_config(paced_mock, storm_redis))
    try:
        asyncio.run(storm(gw, 10, 10))
        flush_after_leases(storm_redis)
        baseline = (gauges(gw)["tollway_process_tasks"], untracked_sockets(gw))

        async def run() -> None:
            await asyncio.gather(*(leave_mid_stream(gw, i) for i in range(100)))

        asyncio.run(run())
        settled(gw, baseline)
        # each left stream is charged its prompt and the tokens sent before it left (the
        # mock sends 32 per reply); one reservation left behind would add 5000
        assert 0 < closed_window_total(storm_redis) <= 100 * (30 + 32)
        records = [r for r in paced_mock.requests() if "bye" in r["body"]]
        assert len(records) == 100 and all(r["disconnected"] for r in records)
    finally:
        gw.stop()


def test_a_member_and_redis_killed_and_restarted_under_load(
    faulty: MockProc, own_server: RedisProc
) -> None:
    """Real process control: member b's own mock process and the Redis store are killed
    mid-load and started again on the same ports. Every request is answered throughout; b
    trips, is probed and serves again; tasks and sockets come back to baseline."""
    port = free_port()
    b = start_mock(port=port, tokens=16)
    text = storm_config(faulty, own_server).replace(
        f"id: b, url: '{faulty.url}'", f"id: b, url: '{b.url}'"
    )
    gw = start_gateway(text)
    try:
        asyncio.run(storm(gw, 20, 20))
        time.sleep(0.6)
        baseline = (gauges(gw)["tollway_process_tasks"], untracked_sockets(gw))
        results: list[tuple[int, int]] = []

        async def load(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            limits = httpx.Limits(max_connections=20)
            async with httpx.AsyncClient(
                base_url=gw.base, headers={"api-key": KEY}, timeout=30, limits=limits
            ) as client:

                async def one(n: int) -> None:
                    i = n
                    while time.monotonic() < deadline:
                        results.append(await chat(client, i))
                        i += 20

                await asyncio.gather(*(one(n) for n in range(20)))

        async def chaos() -> None:
            await asyncio.sleep(0.8)
            await asyncio.to_thread(b.stop)
            await asyncio.sleep(0.4)
            await asyncio.to_thread(own_server.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_server.start)
            await asyncio.sleep(0.4)
            restarted.append(await asyncio.to_thread(start_mock, port, 0, 0, 16))

        restarted: list[MockProc] = []

        async def main() -> None:
            await asyncio.gather(load(5.0), chaos())

        asyncio.run(main())
        assert restarted, "member b did not come back"
        b = restarted[0]
        statuses = {s for s, _ in results}
        assert statuses <= {200, 502, 503}, statuses
        assert sum(s == 200 for s, _ in results) >= 0.9 * len(results)
        b.clear()
        time.sleep(0.6)  # b's trip (500 ms) ends; the next request to it is the probe
        asyncio.run(storm(gw, 20, 5))
        assert b.requests(), "member b got no request after it came back"
        settled(gw, baseline)
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()
        b.stop()
