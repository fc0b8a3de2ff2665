"""Circuit-breaker state shared across gateway processes through the Redis store.

Each process keeps its breakers (proxy/breaker.py) and decides from them, so no request
waits on Redis. With a Redis store, three things make the state everyone's:

- a failure of a `count` rule is also counted in Redis (`lua/breaker_failure.lua`: the
  failures within the interval, across all processes); reaching `count` there trips the
  breaker for every process, even when no single process saw `count` failures;
- a trip made in one process (by its own count, a `percentage` rule, or a backend's
  Retry-After) is written to Redis (`lua/breaker_trip.lua`; a longer trip stays);
- every `POLL_INTERVAL` each process reads every breaker's trip and takes on any it does
  not have yet, for what is left of it.

So a trip reaches the other processes within `POLL_INTERVAL`; a `percentage` rule's
arithmetic stays per process (its successes are not sent to Redis). The calls run beside
the requests (a failure's count is sent in the background); when the store is down the
breakers simply stay per process, with one log line until it answers again.

    tollway:{breaker:<backend id>}:failures   sorted set of failure times (ms), TTL = interval
    tollway:{breaker:<backend id>}:trip       "1" with a PTTL of what is left of the trip
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any

from proxy.breaker import Breaker
from proxy.limits.base import StoreUnavailableError
from proxy.limits.redis import PREFIX, RedisLimiter, Script, hash_tag

log = logging.getLogger("tollway")

POLL_INTERVAL = 1.0  # seconds between reads of every breaker's shared trip
FAILURE = Script.load("breaker_failure.lua", clock_arg=5)
TRIP = Script.load("breaker_trip.lua", clock_arg=None)


def failures_key(backend_id: str) -> str:
    return f"{PREFIX}:{{{hash_tag('breaker:' + backend_id)}}}:failures"


def trip_key(backend_id: str) -> str:
    return f"{PREFIX}:{{{hash_tag('breaker:' + backend_id)}}}:trip"


class SharedBreakers:
    """See the module docstring. `breakers` is read on every poll (it changes on reload)."""

    def __init__(self, store: RedisLimiter, poll_interval: float = POLL_INTERVAL):
        self.store = store
        self.poll_interval = poll_interval
        self.breakers: dict[str, Breaker] = {}
        self.available = True
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{time.time_ns()}-"  # makes failure ids unique
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def failed(self, breaker: Breaker) -> None:
        """A failure the breaker's rule counts (called after the breaker recorded it)."""
        condition = breaker.rule.failure_condition
        if condition.count is not None and not breaker.until:
            self._background(self._count(breaker, condition.count, condition.interval))

    def tripped(self, breaker: Breaker, seconds: float) -> None:
        self._background(self._publish(breaker, seconds))

    async def poll_once(self) -> None:
        """Take on every trip another process made (what the poller does each interval)."""
        now = time.monotonic()
        for backend_id, breaker in list(self.breakers.items()):
            left = await self._call(TRIP, [trip_key(backend_id)], [0])
            if left is not None:
                self._take(breaker, left, now)

    async def _count(self, breaker: Breaker, count: int, interval: float) -> None:
        keys = [failures_key(breaker.backend_id), trip_key(breaker.backend_id)]
        trip_ms = round(breaker.rule.trip_duration * 1000)
        unique = self._prefix + str(next(self._ids))
        args: list[int | str] = [count, round(interval * 1000), trip_ms, unique, ""]
        left = await self._call(FAILURE, keys, args)
        if left:
            self._take(breaker, left, time.monotonic())

    async def _publish(self, breaker: Breaker, seconds: float) -> None:
        await self._call(TRIP, [trip_key(breaker.backend_id)], [max(1, round(seconds * 1000))])

    def _take(self, breaker: Breaker, left_ms: int, now: float) -> None:
        if left_ms > 0 and breaker.until < now + left_ms / 1000 - 0.05:
            breaker.trip_for(now, left_ms / 1000)
            log.warning(
                "circuit breaker for backend %r tripped by another gateway process: "
                "no requests for %.1f s", breaker.backend_id, left_ms / 1000,
            )  # fmt: skip

    async def _call(self, script: Script, keys: list[str], args: list[int | str]) -> int | None:
        try:
            result = int(await self.store.run(script, keys, args))
        except StoreUnavailableError as exc:
            if self.available:
                log.warning("circuit breakers are per process while the store is away: %s", exc)
            self.available = False
            return None
        if not self.available:
            log.warning("circuit breakers are shared again: the store answers")
            self.available = True
        return result

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die
                log.exception("circuit breaker poll failed")

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
