"""Per-process leases of the shared store's current second (proxy/limits/lease.py).

The contract suite (tests/test_limits.py, the `leased` store) proves the rules hold through
leases; these cases prove what leases are for and what they must never do: few round trips,
no drawing after the second ends, at most a share of the room held, nothing left behind.
Real Redis-protocol servers; time is the contract suite's `Clock`, moved by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.limits import Limit, Refused, Reservation
from proxy.limits.base import GRANT_SHARE
from proxy.limits.lease import LeasingLimiter
from proxy.limits.redis import RedisLimiter
from tests.redisproc import RedisProc, run
from tests.test_limits import T0, Clock

pytestmark = pytest.mark.redis


class Counted(RedisLimiter):
    """The Redis store, counting the admissions sent to it."""

    admissions = 0

    async def admit_for(self, limit: Limit, tokens: int, most: int = 0) -> Any:
        self.admissions += 1
        return await super().admit_for(limit, tokens, most)


@contextlib.asynccontextmanager
async def leased(server: RedisProc, clock: Clock) -> AsyncIterator[tuple[LeasingLimiter, Counted]]:
    with server.client() as client:
        client.flushall()
    store = Counted.connect(server.url, clock=clock)
    assert isinstance(store, Counted)
    limiter = LeasingLimiter(store, clock=clock)
    try:
        yield limiter, store
    finally:
        await limiter.close()


async def take(limiter: LeasingLimiter, limit: Limit, tokens: int) -> Reservation:
    decision = await limiter.admit(limit, tokens)
    assert isinstance(decision, Reservation), decision
    return decision


def test_a_busy_second_costs_one_round_trip(server: RedisProc) -> None:
    """50 requests in a second: a few round trips while the lease learns the demand, then
    one for the whole of the next second; and the store holds exactly what was drawn once
    the leases have closed."""
    clock = Clock()
    limit = Limit("team-a", 10**9, 10**12)

    async def main() -> None:
        async with leased(server, clock) as (limiter, store):
            for i in range(50):
                clock.set(i * 0.01)
                await take(limiter, limit, 10)
            learning = store.admissions
            assert learning <= 8  # doubling within the second: 10, 20, 40, ... tokens
            for i in range(50):
                clock.set(1 + i * 0.01)
                await take(limiter, limit, 10)
            assert store.admissions - learning == 1
            clock.set(2.5)
            assert await limiter.usage(limit) == (1000, 1000)  # this process's view
            assert await store.usage(limit) == (1000, 1000)  # the leases gave back the rest

    run(main())


def test_requests_in_flight_wait_for_one_top_up(server: RedisProc) -> None:
    """A new second under load: the requests in flight when the lease ran out wait for one
    request's round trip and draw on its grant, instead of asking the store one each."""
    clock = Clock()
    limit = Limit("team-a", 10**9, 10**12)

    async def main() -> None:
        async with leased(server, clock) as (limiter, store):
            for i in range(50):  # the lease learns the demand: 500 tokens a second
                clock.set(i * 0.01)
                await take(limiter, limit, 10)
            clock.set(1.0)
            asked = store.admissions
            taken = await asyncio.gather(*(take(limiter, limit, 10) for _ in range(30)))
            assert store.admissions - asked == 1
            assert {t.second for t in taken} == {int(T0) + 1}
            clock.set(2.5)
            assert await limiter.usage(limit) == (800, 800)
            assert await store.usage(limit) == (800, 800)  # the leases gave back the rest

    run(main())


def test_an_open_lease_answers_at_once(server: RedisProc) -> None:
    """`admit_now` draws on an open lease that covers the request, with no round trip, and
    defers (None) with no lease, with too little left, or after the lease's second."""
    clock = Clock()
    limit = Limit("team-a", 10**9, 10**12)

    async def main() -> None:
        async with leased(server, clock) as (limiter, store):
            assert limiter.admit_now(limit, 10) is None  # no lease yet
            for i in range(50):  # the lease learns the demand: 500 tokens a second
                clock.set(i * 0.01)
                await take(limiter, limit, 10)
            clock.set(1.0)
            await take(limiter, limit, 10)  # the next second's lease, for the demand
            asked = store.admissions
            drawn = limiter.admit_now(limit, 10)
            assert isinstance(drawn, Reservation) and drawn.tokens == 10
            assert store.admissions == asked  # no round trip
            assert drawn.second == int(T0) + 1
            assert limiter.admit_now(limit, 10**6) is None  # more than the lease holds
            clock.set(2.0)
            assert limiter.admit_now(limit, 10) is None  # its second has ended
            assert store.admissions == asked

    run(main())


def test_a_lease_is_never_drawn_after_its_second(server: RedisProc) -> None:
    clock = Clock(T0 + 0.5)
    limit = Limit("team-a", 10**9, None)

    async def main() -> None:
        async with leased(server, clock) as (limiter, store):
            await take(limiter, limit, 10)
            await take(limiter, limit, 10)  # the lease grows beyond what is drawn
            lease = limiter._keys["team-a"].lease
            assert lease is not None and lease.left > 0
            clock.set(0.999)
            assert (await take(limiter, limit, 1)).second == int(T0)
            before = store.admissions
            clock.set(1.0)  # the bucket's second has ended: a new lease, a new bucket
            late = await take(limiter, limit, 1)
            assert store.admissions == before + 1
            assert late.second == int(T0) + 1
            assert await store.usage(limit) >= (22, 0)  # never less than drawn
            clock.set(2.0)
            assert await limiter.usage(limit) == (22, 0)  # (this closes the ended lease)
            assert await store.usage(limit) == (22, 0)  # exactly that once closed

    run(main())


def test_a_lease_holds_at_most_a_share_of_what_is_left(server: RedisProc) -> None:
    """Another process (a second limiter on the same server) can still take all but what
    the lease holds undrawn, which is at most 1/GRANT_SHARE of the room when it was taken."""
    clock = Clock()
    limit = Limit("team-a", 1600, None)

    async def main() -> None:
        async with leased(server, clock) as (a, _), leased(server, clock) as (b, _):
            for _ in range(5):
                await take(a, limit, 100)
            lease = a._keys["team-a"].lease
            assert lease is not None
            held = lease.left
            assert 0 < held <= (1600 - 500) // GRANT_SHARE
            await take(b, limit, 1600 - 500 - held)  # all the rest fits
            assert isinstance(await b.admit(limit, 1), Refused)
            assert isinstance(await a.admit(limit, held), Reservation)  # its own lease: yes

    run(main())


def test_settlements_after_the_lease_closed_go_to_its_bucket(server: RedisProc) -> None:
    clock = Clock()
    limit = Limit("team-a", 10**6, 10**6, "daily")

    async def main() -> None:
        async with leased(server, clock) as (limiter, store):
            first = await take(limiter, limit, 30)
            await take(limiter, limit, 30)
            clock.set(1.5)  # both leases of second 0 close
            await take(limiter, limit, 5)
            await limiter.settle(first, 10)  # 20 back to second 0's bucket
            assert await limiter.usage(limit) == (45, 45)
            clock.set(61.2)  # second 0 has left the window, second 1 not yet
            assert await limiter.usage(limit) == (5, 45)  # (this closes second 1's lease)
            assert await store.usage(limit) == (5, 45)

    run(main())


def test_close_gives_back_every_undrawn_token(server: RedisProc) -> None:
    clock = Clock()
    limit = Limit("team-a", 10**6, None)

    async def main() -> None:
        async with leased(server, clock) as (limiter, _):
            for _ in range(4):
                await take(limiter, limit, 25)
            lease = limiter._keys["team-a"].lease
            assert lease is not None and lease.left > 0
        async with contextlib.AsyncExitStack():
            store = RedisLimiter.connect(server.url, clock=clock)
            try:
                assert await store.usage(limit) == (100, 0)
            finally:
                await store.close()

    run(main())


def test_refunds_beyond_what_a_lease_may_hold_go_back_at_once(server: RedisProc) -> None:
    """Requests reserve max_tokens and use far less: the refunds must not pile up in the lease
    (where the other processes would count them as used until the second ends)."""
    clock = Clock()
    limit = Limit("team-a", 10**6, None)

    async def main() -> None:
        async with leased(server, clock) as (limiter, store):
            taken = [await take(limiter, limit, 1000) for _ in range(3)]
            lease = limiter._keys["team-a"].lease
            assert lease is not None
            keep = lease.keep
            assert 0 <= lease.left <= keep
            for admitted in taken:
                await limiter.settle(admitted, 10)
            assert lease.left <= keep
            in_window, _ = await store.usage(limit)
            assert in_window == 30 + lease.left  # the rest is back in the store already

    run(main())
