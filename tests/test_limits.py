"""The token-limit contract (proxy/limits/base.py): one suite, run against every store.

Each test runs on the memory store, a real Redis-protocol server, a real 3-node cluster
(`tests/redisproc.py`), and the Redis store behind the gateway's per-process leases
(proxy/limits/lease.py), which must keep every rule. Time is a `Clock` the test moves: the memory store reads it directly,
the Redis store sends it to its scripts in place of the server's `TIME` (its test seam). The
concurrency cases run on real time, the server's clock included.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.limits import Limit, Limiter, MemoryLimiter, Refused, Reservation, period_bounds
from proxy.limits.lease import SWEEP_EVERY, LeasingLimiter
from proxy.limits.redis import TIMEOUT, RedisLimiter, hash_tag
from tests.redisproc import Cluster, RedisProc, run


def at(text: str) -> float:
    """Unix time of a UTC ISO timestamp."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


T0 = at("2026-11-26T09:30:00")  # a Thursday; every offset below is from here


class Clock:
    """A clock the test sets; both stores read it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def set(self, offset: float) -> None:
        self.now = T0 + offset


class Store:
    """How to open limiters on one backend (`url` None: the memory store)."""

    def __init__(self, name: str, url: str | None) -> None:
        self.name = name
        self.url = url

    @contextlib.asynccontextmanager
    async def open(
        self, clock: Clock | None = None, timeout: float = TIMEOUT
    ) -> AsyncIterator[Limiter]:
        """A fresh limiter; `clock` None means real time (the server's, for Redis)."""
        limiter: Limiter
        if self.url is None:
            limiter = MemoryLimiter(clock or time.time)
        elif self.name == "leased":
            shared = RedisLimiter.connect(self.url, clock=clock, timeout=timeout)
            limiter = LeasingLimiter(shared, clock=clock or time.monotonic)
        else:
            limiter = RedisLimiter.connect(self.url, clock=clock, timeout=timeout)
        try:
            yield limiter
        finally:
            await limiter.close()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
        pytest.param("leased", marks=pytest.mark.redis),
    ]
)
def store(request: pytest.FixtureRequest) -> Store:
    """Each store in turn, empty."""
    if request.param in ("redis", "leased"):
        server: RedisProc = request.getfixturevalue("server")
        with server.client() as client:
            client.flushall()
        return Store(request.param, server.url)
    if request.param == "cluster":
        cluster: Cluster = request.getfixturevalue("cluster")
        cluster.flush()
        return Store("cluster", cluster.url)
    return Store("memory", None)


async def admitted(limiter: Limiter, limit: Limit, tokens: int) -> Reservation:
    decision = await limiter.admit(limit, tokens)
    assert isinstance(decision, Reservation), decision
    return decision


async def refused(limiter: Limiter, limit: Limit, tokens: int) -> Refused:
    decision = await limiter.admit(limit, tokens)
    assert isinstance(decision, Refused), decision
    return decision


# -- admission


@pytest.mark.parametrize(
    ("tpm", "quota", "steps"),
    [
        # each step: tokens admitted -> (remaining tokens, remaining quota)
        (100, 1000, [(30, 70, 970), (30, 40, 940), (40, 0, 900)]),
        (100, None, [(100, 0, None)]),
        (None, 50, [(20, None, 30), (30, None, 0)]),
        (None, None, [(10**9, None, None)]),
        (100, 1000, [(0, 100, 1000)]),
    ],
)
def test_admit_within_limits(
    store: Store, tpm: int | None, quota: int | None, steps: list[tuple[int, Any, Any]]
) -> None:
    limit = Limit("team-a", tpm, quota)

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            for tokens, left_tokens, left_quota in steps:
                decision = await admitted(limiter, limit, tokens)
                assert (decision.remaining_tokens, decision.remaining_quota) == (
                    left_tokens,
                    left_quota,
                )
                assert decision.tokens == tokens
                assert decision.store is limiter
            total = sum(tokens for tokens, _, _ in steps)
            expected = (total if tpm is not None else 0, total if quota is not None else 0)
            assert await limiter.usage(limit) == expected

    run(main())


def test_admit_now_answers_as_admit_would_or_defers(store: Store) -> None:
    """The handler's path: the memory store answers `admit_now` at once, as `admit` would
    (a refusal changes nothing); a store that must be asked defers (None) and charges
    nothing. (An open lease's draw: tests/test_lease.py.)"""
    limit = Limit("team-a", 100, 1000)

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            first = limiter.admit_now(limit, 30)
            if store.name != "memory":
                assert first is None
                assert await limiter.usage(limit) == (0, 0)
                return
            assert isinstance(first, Reservation)
            assert (first.tokens, first.remaining_tokens, first.remaining_quota) == (30, 70, 970)
            refusal = limiter.admit_now(limit, 80)
            assert isinstance(refusal, Refused) and refusal.reason == "rate"
            assert await limiter.usage(limit) == (30, 30)

    run(main())


def test_reservation_names_bucket_and_period(store: Store) -> None:
    async def main() -> None:
        async with store.open(Clock(T0 + 0.75)) as limiter:
            with_quota = await admitted(limiter, Limit("k", 100, 100, "daily"), 1)
            assert (with_quota.second, with_quota.period) == (
                int(T0),
                "2026-11-26",
            )
            rate_only = await admitted(limiter, Limit("k", 100, None), 1)
            assert rate_only.period == ""

    run(main())


@pytest.mark.parametrize(
    ("charges", "now", "tokens", "retry_after"),
    [
        # charges: (offset, tokens) admitted in order; then at `now`, ask for `tokens`
        ([(0, 100)], 10.25, 1, 50.75),
        ([(0.5, 30), (10, 30), (20.5, 40)], 30.25, 20, 30.75),  # the oldest bucket is enough
        ([(0.5, 30), (10, 30), (20.5, 40)], 30.25, 50, 40.75),  # two must leave
        ([(0.5, 30), (10, 30), (20.5, 40)], 30.25, 100, 50.75),  # all must leave
        ([(5.1, 50), (5.9, 50)], 6.0, 10, 60.0),  # one second, one bucket
        ([(0, 60), (59.5, 40)], 59.75, 50, 1.25),  # the oldest is about to leave
        ([(0, 10), (30, 80)], 45.5, 25, 45.5),  # a small old bucket is not enough
        ([(0, 50), (70, 50)], 80.0, 60, 51.0),  # the first bucket has already left
    ],
)
def test_refuse_rate_with_exact_retry_after(
    store: Store,
    charges: list[tuple[float, int]],
    now: float,
    tokens: int,
    retry_after: float,
) -> None:
    limit = Limit("team-a", 100, 10_000)
    clock = Clock()

    async def main() -> None:
        async with store.open(clock) as limiter:
            for offset, charged in charges:
                clock.set(offset)
                await admitted(limiter, limit, charged)
            clock.set(now)
            before = await limiter.usage(limit)
            decision = await refused(limiter, limit, tokens)
            assert decision.reason == "rate"
            assert decision.retry_after == pytest.approx(retry_after, abs=1e-6)
            assert decision.remaining_tokens == 100 - before[0]
            assert decision.remaining_quota == 10_000 - before[1]
            assert await limiter.usage(limit) == before  # a refusal changes nothing
            clock.set(now + retry_after)  # and then it fits
            await admitted(limiter, limit, tokens)

    run(main())


def test_more_than_tokens_per_minute_never_fits(store: Store) -> None:
    limit = Limit("team-a", 100, 10_000)

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            decision = await refused(limiter, limit, 101)
            assert (decision.reason, decision.retry_after) == ("rate", 60.0)
            assert (decision.remaining_tokens, decision.remaining_quota) == (100, 10_000)
            assert await limiter.usage(limit) == (0, 0)

    run(main())


@pytest.mark.parametrize(
    ("period", "now", "retry_after"),
    [
        ("hourly", "2026-11-26T09:30:00", 1800.0),
        ("daily", "2026-11-26T09:30:00", 14.5 * 3600),
        ("weekly", "2026-11-26T09:30:00", 3 * 86400 + 14.5 * 3600),  # to Monday 00:00
        ("monthly", "2026-11-30T23:59:30.250", 29.75),
        ("monthly", "2026-02-28T12:00:00", 12 * 3600),
        ("yearly", "2026-12-31T23:00:00", 3600.0),
    ],
)
def test_refuse_quota_until_period_end(
    store: Store, period: str, now: str, retry_after: float
) -> None:
    limit = Limit("team-a", 1000, 100, period)

    async def main() -> None:
        async with store.open(Clock(at(now))) as limiter:
            await admitted(limiter, limit, 90)
            decision = await refused(limiter, limit, 11)
            assert decision.reason == "quota"
            assert decision.retry_after == pytest.approx(retry_after, abs=1e-6)
            assert (decision.remaining_tokens, decision.remaining_quota) == (910, 10)
            await admitted(limiter, limit, 10)  # exactly up to the quota

    run(main())


@pytest.mark.parametrize(
    ("tpm", "quota", "second", "reason"),
    [
        (1000, 100, 50, "quota"),  # the quota refuses: the window keeps only the first 60
        (100, 1000, 50, "rate"),  # the rate refuses: the quota keeps only the first 60
        (100, 100, 50, "quota"),  # both would: the quota is checked first (403 lasts longer)
    ],
)
def test_all_or_nothing(store: Store, tpm: int, quota: int, second: int, reason: str) -> None:
    limit = Limit("team-a", tpm, quota)

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            await admitted(limiter, limit, 60)
            decision = await refused(limiter, limit, second)
            assert decision.reason == reason
            assert await limiter.usage(limit) == (60, 60)

    run(main())


# -- settling


@pytest.mark.parametrize(
    ("reserved", "used", "usage", "left"),
    [
        (50, 30, (30, 30), (70, 970)),  # down: the difference comes back
        (50, 50, (50, 50), (50, 950)),
        (50, 80, (80, 80), (20, 920)),  # up: usage beyond the reservation is charged
        (50, 150, (150, 150), (0, 850)),  # even past the limit; remaining never below 0
        (50, 0, (0, 0), (100, 1000)),  # nothing used: all of it back
    ],
)
def test_settle(
    store: Store,
    reserved: int,
    used: int,
    usage: tuple[int, int],
    left: tuple[int, int],
) -> None:
    limit = Limit("team-a", 100, 1000)

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            decision = await admitted(limiter, limit, reserved)
            assert await limiter.settle(decision, used) == left
            assert await limiter.usage(limit) == usage

    run(main())


@pytest.mark.parametrize(("reserved", "used", "usage"), [(50, 20, (20, 20)), (50, 80, (80, 80))])
def test_settle_soon_applies_the_same(
    store: Store, reserved: int, used: int, usage: tuple[int, int]
) -> None:
    """What the handler uses: the settlement is sent, not awaited, and ends as `settle`'s."""
    limit = Limit("team-a", 100, 1000)
    failures: list[BaseException] = []

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            decision = await admitted(limiter, limit, reserved)
            limiter.settle_soon(decision, used, failures.append)
            deadline = time.monotonic() + 5
            while await limiter.usage(limit) != usage and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # on a cluster it is a call of its own, in a task
            assert await limiter.usage(limit) == usage
            assert failures == []

    run(main())


def test_release_restores_exactly(store: Store) -> None:
    limit = Limit("team-a", 100, 1000)

    async def main() -> None:
        async with store.open(Clock()) as limiter:
            kept = await admitted(limiter, limit, 30)
            released = await admitted(limiter, limit, 70)
            await limiter.release(released)
            assert await limiter.usage(limit) == (30, 30)
            assert await limiter.settle(kept, 30) == (70, 970)

    run(main())


@pytest.mark.parametrize(
    ("script", "usage"),
    [
        # (offset, action) in order: admit N as the next reservation, or settle the first one
        ([(0, "admit 50"), (61, "settle 10")], (0, 10)),  # its bucket had left: only the quota
        ([(0, "admit 50"), (30, "settle 80")], (80, 80)),  # beyond: charged now
        ([(0, "admit 50"), (30, "settle 80"), (61, "usage")], (30, 80)),  # ...so it stays
        ([(0, "admit 50"), (10, "admit 40"), (20, "settle 0")], (40, 40)),  # only its bucket
        ([(0, "admit 50"), (0, "admit 30"), (1, "settle 0")], (30, 30)),  # same bucket
        (
            [(0, "admit 50"), (0, "admit 30"), (1, "settle 0"), (2, "settle 0")],
            (0, 0),
        ),  # a caller's double release: never below 0
    ],
)
def test_settle_later(
    store: Store, script: list[tuple[float, str]], usage: tuple[int, int]
) -> None:
    limit = Limit("team-a", 100, 1000)
    clock = Clock()

    async def main() -> None:
        async with store.open(clock) as limiter:
            reservations = []
            for offset, action in script:
                clock.set(offset)
                verb, _, number = action.partition(" ")
                if verb == "admit":
                    reservations.append(await admitted(limiter, limit, int(number)))
                elif verb == "settle":
                    await limiter.settle(reservations[0], int(number))
            assert await limiter.usage(limit) == usage

    run(main())


def test_settle_across_a_period_boundary(store: Store) -> None:
    limit = Limit("team-a", 1000, 1000, "monthly")
    clock = Clock(at("2026-11-30T23:59:50"))

    async def main() -> None:
        async with store.open(clock) as limiter:
            first = await admitted(limiter, limit, 50)
            second = await admitted(limiter, limit, 50)
            clock.now = at("2026-12-01T00:00:10")
            assert await limiter.usage(limit) == (100, 0)
            await limiter.settle(first, 20)  # down: 30 back to November
            await limiter.settle(second, 80)  # up: the 30 extra are December's
            assert await limiter.usage(limit) == (100, 30)
            clock.now = at("2026-11-30T23:59:59")
            assert await limiter.usage(Limit("team-a", None, 1000, "monthly")) == (0, 70)

    run(main())


# -- the window moves


def test_window_slides(store: Store) -> None:
    limit = Limit("team-a", 100, None)
    clock = Clock()

    async def main() -> None:
        async with store.open(clock) as limiter:
            clock.set(0.5)
            await admitted(limiter, limit, 100)  # bucket T0
            clock.set(60.75)  # 60.25 s later: still inside a 60-s interval with the charge's second
            assert (await refused(limiter, limit, 1)).retry_after == pytest.approx(0.25)
            clock.set(61.0)  # bucket T0 leaves the window
            assert await limiter.usage(limit) == (0, 0)
            assert (await admitted(limiter, limit, 100)).remaining_tokens == 0
            clock.set(121.999)
            assert await limiter.usage(limit) == (100, 0)
            clock.set(122.0)
            assert await limiter.usage(limit) == (0, 0)

    run(main())


@pytest.mark.parametrize(
    ("period", "now", "expected"),
    [
        (
            "hourly",
            "2026-11-26T09:30:00",
            ("2026-11-26T09", "2026-11-26T09:00", "2026-11-26T10:00"),
        ),
        (
            "hourly",
            "2026-12-31T23:59:59.999",
            ("2026-12-31T23", "2026-12-31T23:00", "2027-01-01T00:00"),
        ),
        ("daily", "2026-11-26T00:00:00", ("2026-11-26", "2026-11-26T00:00", "2026-11-27T00:00")),
        ("daily", "2028-02-28T12:00:00", ("2028-02-28", "2028-02-28T00:00", "2028-02-29T00:00")),
        (
            "weekly",
            "2026-11-26T09:30:00",
            ("2026-W48", "2026-11-23T00:00", "2026-11-30T00:00"),
        ),  # Thursday
        (
            "weekly",
            "2026-11-23T00:00:00",
            ("2026-W48", "2026-11-23T00:00", "2026-11-30T00:00"),
        ),  # Monday
        (
            "weekly",
            "2026-11-29T23:59:59",
            ("2026-W48", "2026-11-23T00:00", "2026-11-30T00:00"),
        ),  # Sunday
        (
            "weekly",
            "2027-01-01T12:00:00",
            ("2026-W53", "2026-12-28T00:00", "2027-01-04T00:00"),
        ),  # ISO year
        ("weekly", "2025-12-31T12:00:00", ("2026-W01", "2025-12-29T00:00", "2026-01-05T00:00")),
        ("monthly", "2026-11-30T23:59:59", ("2026-11", "2026-11-01T00:00", "2026-12-01T00:00")),
        ("monthly", "2026-12-15T00:00:00", ("2026-12", "2026-12-01T00:00", "2027-01-01T00:00")),
        ("monthly", "2028-02-29T00:00:00", ("2028-02", "2028-02-01T00:00", "2028-03-01T00:00")),
        ("yearly", "2026-12-31T23:59:59", ("2026", "2026-01-01T00:00", "2027-01-01T00:00")),
        ("yearly", "2027-01-01T00:00:00", ("2027", "2027-01-01T00:00", "2028-01-01T00:00")),
    ],
)
def test_period_bounds(period: str, now: str, expected: tuple[str, str, str]) -> None:
    ident, start, end = expected
    assert period_bounds(period, at(now)) == (ident, at(start), at(end))


def test_period_bounds_rejects_unknown_periods() -> None:
    with pytest.raises(ValueError, match="fortnightly"):
        period_bounds("fortnightly", T0)


# -- exactness under concurrency


@pytest.mark.parametrize(
    ("limit", "usage"),
    [
        (Limit("team-a", 1000, None), (1000, 0)),
        (Limit("team-a", None, 1000), (0, 1000)),
        (Limit("team-a", 1000, 1000), (1000, 1000)),
    ],
    ids=["rate", "quota", "both"],
)
@pytest.mark.parametrize("clients", [1, 4])
def test_concurrent_admits_are_exact(
    store: Store, limit: Limit, usage: tuple[int, int], clients: int
) -> None:
    """200 concurrent admits of 10 against 1000: exactly 100 pass, on real time. Redis gets
    `clients` separate connections; memory counters are per process, so there the callers
    share one limiter. (Exactness, not timeouts, is tested here: a cluster client opening
    its connections to three nodes at once on a loaded CI machine can take longer than the
    store's 0.5-s timeout, which failed two full CI runs, so it gets 5 s.)"""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if store.url is None:
                limiters = [await stack.enter_async_context(store.open())] * clients
            else:
                limiters = [
                    await stack.enter_async_context(store.open(timeout=5.0)) for _ in range(clients)
                ]
            decisions = await asyncio.gather(
                *(limiters[i % clients].admit(limit, 10) for i in range(200))
            )
            admits = [d for d in decisions if isinstance(d, Reservation)]
            assert len(admits) == 100
            assert await limiters[0].usage(limit) == usage
            refusals = [d for d in decisions if isinstance(d, Refused)]
            assert all(0 < r.retry_after <= 61 or r.reason == "quota" for r in refusals)
            await asyncio.gather(*(a.store.release(a) for a in admits))
            if store.name == "leased":  # another process's lease gives back when its second
                await asyncio.sleep(1 + 2 * SWEEP_EVERY)  # has ended (and the sweep ran)
            assert await limiters[-1].usage(limit) == (0, 0)

    run(main())


# -- counter keys


KEYS = [
    "team-a",
    "{team-a}",
    "team}a",
    "a{b}c",
    "}",
    "{",
    "",
    "with spaces and\ttabs",
    "ünïcødé チーム 🚀",
    hash_tag("{team-a}"),  # what a hashed key looks like: still a key of its own
    "x" * 300,
    "x" * 301,
]


def test_counter_keys_are_independent(store: Store) -> None:
    async def main() -> None:
        async with store.open(Clock()) as limiter:
            for i, key in enumerate(KEYS):
                await admitted(limiter, Limit(key, 100, 1000, "daily"), i + 1)
            for i, key in enumerate(KEYS):
                assert await limiter.usage(Limit(key, 100, 1000, "daily")) == (i + 1, i + 1)

    run(main())


def test_memory_store_forgets_idle_keys() -> None:
    """Backend-specific: the memory store stays bounded (a peek at its internals)."""
    clock = Clock()
    limiter = MemoryLimiter(clock)

    async def main() -> None:
        for i in range(100):
            await admitted(limiter, Limit(f"k{i}", 100, 100, "hourly"), 1)
        clock.set(3600 + 86400 + 61)  # past the windows and a day past the hour
        await admitted(limiter, Limit("fresh", 100, 100, "hourly"), 1)
        assert set(limiter._keys) == {"fresh"}
        assert set(limiter._counts) == {("fresh", "2026-11-27T10")}

    run(main())
