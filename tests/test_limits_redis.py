"""What only the Redis store does: scripts, key layout, cluster slots, outages and recovery.

The shared rules are proven for every store in tests/test_limits.py; these cases run against
real servers from tests/redisproc.py, and kill, pause and restart them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.crc import key_slot

from proxy.limits import Limit, Reservation, StoreUnavailableError
from proxy.limits.redis import TIMEOUT, RedisLimiter, hash_tag, quota_key, rate_key
from tests.redisproc import Cluster, RedisProc, free_ports, run
from tests.test_limits import KEYS, at

pytestmark = pytest.mark.redis

PROMPT = 2 * TIMEOUT + 0.25  # the longest an outage may take to surface: two tries, timed out


@contextlib.asynccontextmanager
async def open_limiter(url: str, **kwargs: Any) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.connect(url, **kwargs)
    try:
        yield limiter
    finally:
        await limiter.close()


async def timed_failure(limiter: RedisLimiter, limit: Limit) -> float:
    """Seconds until `admit` raised StoreUnavailableError."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        await limiter.admit(limit, 1)
    return time.monotonic() - start


LIMIT = Limit("team-a", 1000, 10_000, "daily")


# -- scripts and keys


@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_a_settlement_sent_twice_with_one_id_applies_once(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """What a replay after a timeout relies on (proxy/limits/failover.py): settle.lua applies
    a settlement once per id, a second call only reports; another id applies again."""
    target: RedisProc | Cluster = request.getfixturevalue(kind)
    if isinstance(target, Cluster):
        target.flush()
    else:
        with target.client() as client:
            client.flushall()
    limit = Limit("team-a", 1000, 10_000, "daily")

    async def main() -> None:
        async with open_limiter(target.url) as limiter:
            first = await limiter.admit(limit, 500)
            assert isinstance(first, Reservation)
            assert await limiter.settle(first, 120, once="a") == (880, 9880)
            assert await limiter.settle(first, 120, once="a") == (880, 9880)  # reported only
            second = await limiter.admit(limit, 100)
            assert isinstance(second, Reservation)
            limiter.settle_soon(second, 50, once="b")
            limiter.settle_soon(second, 50, once="b")
            deadline = time.monotonic() + 5  # on a cluster each is a call of its own, in a
            while await limiter.usage(limit) == (220, 220) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # task: wait for the first, then time for both
            await asyncio.sleep(0.1)
            assert await limiter.usage(limit) == (170, 170)
            await limiter.settle(second, 50, once="c")
            assert await limiter.usage(limit) == (120, 120)
            rate_only = Limit("team-b", 1000, None)  # an id as the second of two keys
            third = await limiter.admit(rate_only, 100)
            assert isinstance(third, Reservation)
            assert await limiter.settle(third, 40, once="d") == (960, None)
            assert await limiter.settle(third, 40, once="d") == (960, None)

    run(main())


def test_a_turns_settlement_runs_before_its_admission_on_a_new_server(server: RedisProc) -> None:
    """The scripts are loaded on every new connection, so a settlement sent before an
    admission in one loop turn (how a lease gives back before it asks again) runs first even
    on a server that had never run settle.lua: a NOSCRIPT resend would run it second."""
    with server.client() as client:
        client.flushall()
        client.script_flush()
    limit = Limit("team-a", 100, None)

    async def main() -> None:
        async with open_limiter(server.url) as limiter:
            full = await limiter.admit(limit, 100)
            assert isinstance(full, Reservation)
            limiter.settle_soon(full, 0)  # gives all 100 back, in this turn's batch
            again = await limiter.admit(limit, 100)
            assert isinstance(again, Reservation), again

    run(main())


@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_scripts_survive_script_flush(request: pytest.FixtureRequest, kind: str) -> None:
    target: RedisProc | Cluster = request.getfixturevalue(kind)
    nodes = target.nodes if isinstance(target, Cluster) else [target]

    async def main() -> None:
        async with open_limiter(target.url) as limiter:
            first = await limiter.admit(LIMIT, 10)
            assert isinstance(first, Reservation)
            before = await limiter.usage(LIMIT)
            for node in nodes:
                with node.client() as client:
                    client.script_flush()
            assert isinstance(await limiter.admit(LIMIT, 10), Reservation)  # admit.lua reloaded
            for node in nodes:
                with node.client() as client:
                    client.script_flush()
            await limiter.release(first)  # settle.lua reloaded
            assert await limiter.usage(LIMIT) == before

    run(main())


def test_one_turns_decisions_share_one_script_call(server: RedisProc) -> None:
    """Admissions made in one event-loop turn go in one call and are decided in order: of 30
    concurrent requests for 40 tokens under a 1,000-token limit exactly 25 fit; their
    settlements go in one call too, and each caller gets its own answer."""
    limit = Limit("batch", 1000, None)

    def script_calls() -> int:
        with server.client() as client:
            stats = client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))

    async def main() -> None:
        async with open_limiter(server.url) as limiter:
            await limiter.admit(Limit("warm-up", 10, None), 1)  # connected, scripts loaded
            await limiter.usage(limit)
            calls = script_calls()
            decisions = await asyncio.gather(*(limiter.admit(limit, 40) for _ in range(30)))
            admitted = [d for d in decisions if isinstance(d, Reservation)]
            assert len(admitted) == 25
            assert [d.remaining_tokens for d in admitted] == list(range(960, -1, -40))
            assert script_calls() == calls + 1
            left = await asyncio.gather(*(limiter.settle(d, 30) for d in admitted))
            assert script_calls() == calls + 2
            assert left[-1] == (250, None)  # every settlement applied: 25 x 30 = 750 in use
            assert await limiter.usage(limit) == (750, 0)

    run(main())


def test_key_layout_and_expiry(server: RedisProc) -> None:
    """One hash for the window, one counter per period expiring a day after it ends."""
    now = at("2026-11-26T09:30:00")
    limit = Limit("team-b", 100, 1000, "daily")

    async def main() -> None:
        async with open_limiter(server.url, clock=lambda: now) as limiter:
            await limiter.admit(limit, 7)

    run(main())
    with server.client() as client:
        assert client.hgetall("tollway:{team-b}:rate") == {str(int(now)).encode(): b"7"}
        assert 62_000 < client.pttl("tollway:{team-b}:rate") <= 63_000
        assert client.get("tollway:{team-b}:q:2026-11-26") == b"7"
        expected = (at("2026-11-27T00:00:00") - now + 86400) * 1000
        assert expected - 5000 < client.pttl("tollway:{team-b}:q:2026-11-26") <= expected


def test_server_time_is_the_window_clock(server: RedisProc) -> None:
    """Without the test seam the window follows the server's TIME, not the gateway's."""

    async def main() -> None:
        async with open_limiter(server.url) as limiter:
            decision = await limiter.admit(Limit("team-c", 100, None), 1)
            assert isinstance(decision, Reservation)
            with server.client() as client:
                seconds, _ = client.time()
            assert seconds - 1 <= decision.second <= seconds

    run(main())


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("team-a", "team-a"),
        ("ünïcødé チーム", "ünïcødé チーム"),
        ("with space", "with space"),
        ("{team-a}", None),
        ("a}b", None),
        ("", None),
        ("#team-a", None),
        ("x" * 129, None),
    ],
)
def test_hash_tag(key: str, tag: str | None) -> None:
    """Plain keys are their own tag; any that could break or fake one is hashed."""
    hashed = "#" + hashlib.sha256(key.encode()).hexdigest()
    assert hash_tag(key) == (hashed if tag is None else tag)


def test_cluster_keys_share_one_slot_per_counter_key(cluster: Cluster) -> None:
    clock = at("2026-11-26T09:30:00")
    cluster.flush()

    async def main() -> None:
        async with open_limiter(cluster.url, clock=lambda: clock) as limiter:
            for key in KEYS:
                assert isinstance(
                    await limiter.admit(Limit(key, 100, 1000, "weekly"), 1), Reservation
                )

    run(main())
    owner: dict[bytes, int] = {}  # every key stored, and the node holding it
    for i, node in enumerate(cluster.nodes):
        with node.client() as client:
            owner.update(dict.fromkeys(client.keys("tollway:*"), i))
    nodes_used = set()
    for key in KEYS:
        names = [rate_key(key).encode(), quota_key(key, "2026-W48").encode()]
        assert {name in owner for name in names} == {True}, key
        assert len({key_slot(name) for name in names}) == 1, key
        assert len({owner[name] for name in names}) == 1, key
        nodes_used.add(owner[names[0]])
    assert len(owner) == 2 * len(KEYS)
    assert len(nodes_used) > 1  # the keys do spread over the cluster


# -- outages


def test_nothing_listening() -> None:
    (port,) = free_ports(1)

    async def main() -> None:
        async with open_limiter(f"redis://127.0.0.1:{port}") as limiter:
            assert await timed_failure(limiter, LIMIT) < PROMPT

    run(main())


def test_server_killed_then_restarted(own_server: RedisProc) -> None:
    async def main() -> None:
        async with open_limiter(own_server.url) as limiter:
            assert isinstance(await limiter.admit(LIMIT, 10), Reservation)
            own_server.kill()
            assert await timed_failure(limiter, LIMIT) < PROMPT
            assert await timed_failure(limiter, LIMIT) < PROMPT
            own_server.start()  # same port, empty
            assert isinstance(await limiter.admit(LIMIT, 10), Reservation)  # same limiter
            assert await limiter.usage(LIMIT) == (10, 10)

    run(main())


def test_hung_server_times_out(own_server: RedisProc) -> None:
    async def main() -> None:
        async with open_limiter(own_server.url) as limiter:
            assert isinstance(await limiter.admit(LIMIT, 10), Reservation)
            own_server.pause()
            try:
                assert await timed_failure(limiter, LIMIT) < PROMPT
            finally:
                own_server.resume()
            assert isinstance(await limiter.admit(LIMIT, 10), Reservation)

    run(main())


def test_cluster_node_killed_then_restarted(cluster: Cluster) -> None:
    """Keys on a dead node fail promptly, others keep working; the node's return heals."""
    dead = cluster.nodes[1]  # not nodes[0], the URL's node: the client must find the rest
    names = [f"k{i}" for i in range(100)]
    on_dead = [k for k in names if cluster.node_for(rate_key(k)) is dead][:2]
    elsewhere = [k for k in names if cluster.node_for(rate_key(k)) is not dead][:2]

    async def main() -> None:
        async with open_limiter(cluster.url) as limiter:
            for key in on_dead + elsewhere:
                assert isinstance(await limiter.admit(Limit(key, 100, None), 1), Reservation)
            dead.kill()
            for key in on_dead:
                assert await timed_failure(limiter, Limit(key, 100, None)) < PROMPT
            for key in elsewhere:
                assert isinstance(await limiter.admit(Limit(key, 100, None), 1), Reservation)
            dead.start()  # same port, same nodes.conf: it takes its slots back
            deadline = time.monotonic() + 10
            while True:
                try:
                    decisions = await asyncio.gather(
                        *(limiter.admit(Limit(k, 10**6, None), 1) for k in on_dead * 50)
                    )
                    break
                except StoreUnavailableError:
                    assert time.monotonic() < deadline, "the cluster did not heal"
                    await asyncio.sleep(0.1)
            assert all(isinstance(d, Reservation) for d in decisions)

    run(main())


def test_unknown_url_scheme() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisLimiter.connect("memcached://127.0.0.1:11211")


def test_the_package_does_not_load_redis() -> None:
    """`proxy.limits` (protocol, memory store) imports no redis; only `.redis` does."""
    code = "import sys, proxy.limits; assert 'redis' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
