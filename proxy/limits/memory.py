"""The in-process token-limit store: the rules of `proxy.limits.base`, exact within one process.

Each decision runs without an `await`, so on one event loop it is atomic. State per counter
key (`_Key`): a dict second -> tokens (at most 61 live buckets, trimmed when the oldest has
left), their running sum, and the key's current quota-period counter, so an admission is a
few attribute reads and one dict lookup. Period counters live in one dict by (key, period
id) whatever their period kind. A sweep at most once a minute drops keys with no live bucket
and period counters a day past their period's end, so idle keys do not accumulate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from proxy.limits.base import (
    LEAVES,
    Failed,
    Limit,
    Refused,
    Reservation,
    grant,
    period_bounds,
    rate_retry_after,
    remaining,
)

SWEEP_EVERY = 60.0  # seconds of clock time between sweeps
KEEP_PERIOD = 86400.0  # a period counter outlives its period by a day, like its Redis key
_NONE_YET = math.inf  # the oldest bucket of an empty window


class _Count:
    """One quota period's counter."""

    __slots__ = ("end", "period", "start", "used")

    def __init__(self, period: str, start: float, end: float) -> None:
        self.period, self.start, self.end = period, start, end
        self.used = 0


class _Key:
    """One counter key: its rate window and the quota counter admissions last used."""

    __slots__ = ("buckets", "count", "count_kind", "oldest", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}  # in the order they were made (time order)
        self.total = 0  # the buckets' sum
        self.oldest: float = _NONE_YET  # the first bucket's second
        self.count: _Count | None = None
        self.count_kind = ""  # the quota period kind `count` belongs to


class MemoryLimiter:
    """Per-process counters; `clock` (default `time.time`) lets tests drive time."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._counts: dict[tuple[str, str], _Count] = {}
        self._next_sweep = 0.0

    async def admit(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused:
        return self.admit_now(limit, tokens, most)

    def admit_now(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused:
        """Always answered at once: nothing here waits."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        second = math.floor(now)
        state = self._keys.get(limit.key) or self._key(limit.key)
        tpm, quota = limit.tokens_per_minute, limit.token_quota
        used = quota_used = 0
        if tpm is not None:
            if state.oldest <= second - LEAVES:
                self._trim(state, second)
            used = state.total
        count = None
        if quota is not None:
            count = self._count(state, limit, now)
            quota_used = count.used
            if quota_used + tokens > quota:
                return Refused("quota", count.end - now, *remaining(limit, used, quota_used))
        if tpm is not None and used + tokens > tpm:
            retry_after = rate_retry_after(state.buckets.items(), used, tokens, tpm, now)
            return Refused("rate", retry_after, *remaining(limit, used, quota_used))
        if most > tokens:  # the least room the window and the quota leave (None: unlimited)
            rooms = [cap - n for cap, n in ((tpm, used), (quota, quota_used)) if cap is not None]
            tokens = grant(tokens, most, min(rooms) if rooms else None)
        if tpm is not None:
            self._add(state, second, tokens)
        period = ""
        if count is not None:
            count.used += tokens
            period = count.period
        # What is left cannot be negative here: the window and the quota both fit `tokens`.
        return Reservation(
            limit, tokens, second, period, self,
            None if tpm is None else tpm - used - tokens,
            None if quota is None else quota - quota_used - tokens,
            state,
        )  # fmt: skip

    async def admit_for(
        self, limit: Limit, tokens: int, most: int = 0
    ) -> tuple[Reservation | Refused, float]:
        """`admit`, and how long the second it charged lasts (proxy/limits/lease.py)."""
        decision = await self.admit(limit, tokens, most)
        if isinstance(decision, Refused):
            return decision, 0.0
        return decision, max(0.0, decision.second + 1 - self._clock())

    async def settle(self, reservation: Reservation, used: int) -> tuple[int | None, int | None]:
        self.settle_soon(reservation, used)
        return remaining(reservation.limit, *self._used(reservation.limit, self._clock()))

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None
    ) -> None:
        """At once: this store cannot fail. Less than reserved goes back to the bucket and
        period it was charged in; more is charged to the current second and period."""
        delta = used - reservation.tokens
        if not delta:
            return
        limit = reservation.limit
        state = reservation.held if reservation.held is not None else self._key(limit.key)
        now = self._clock()
        if delta > 0:
            if limit.tokens_per_minute is not None:
                self._add(state, math.floor(now), delta)
            if limit.token_quota is not None:
                self._count(state, limit, now).used += delta
            return
        back = -delta
        buckets, second = state.buckets, reservation.second
        # (comparisons rather than min()/max() and floor(): this runs on every request)
        if second + LEAVES > now and (charged := buckets.get(second)):  # still in the window
            taken = back if back < charged else charged
            buckets[second] = charged - taken
            state.total -= taken
        if reservation.period:
            count = state.count
            if count is None or count.period != reservation.period:
                count = self._counts.get((limit.key, reservation.period))
            if count is not None:
                left = count.used - back
                count.used = left if left > 0 else 0

    async def release(self, reservation: Reservation) -> None:
        self.settle_soon(reservation, 0)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        return self._used(limit, self._clock())

    async def close(self) -> None:
        self._keys.clear()
        self._counts.clear()

    def _key(self, key: str) -> _Key:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        return state

    def _count(self, state: _Key, limit: Limit, now: float) -> _Count:
        """The key's counter for the quota period containing `now`."""
        count = state.count
        if (
            count is not None
            and state.count_kind == limit.quota_period
            and count.start <= now < count.end
        ):
            return count
        period, start, end = period_bounds(limit.quota_period, now)
        count = self._counts.get((limit.key, period))
        if count is None:
            count = self._counts[(limit.key, period)] = _Count(period, start, end)
        state.count, state.count_kind = count, limit.quota_period
        return count

    @staticmethod
    def _add(state: _Key, second: int, tokens: int) -> None:
        buckets = state.buckets
        if not buckets:
            state.oldest = second
        buckets[second] = buckets.get(second, 0) + tokens
        state.total += tokens

    @staticmethod
    def _trim(state: _Key, second: int) -> None:
        """Drop the buckets that have left the window at `second`. Buckets are made in time
        order, so the stale ones are at the front (a clock stepping back can leave one stale
        bucket a little longer: an over-count, never an under-count)."""
        buckets, horizon = state.buckets, second - LEAVES
        while buckets:
            oldest = next(iter(buckets))
            if oldest > horizon:
                state.oldest = oldest
                return
            state.total -= buckets.pop(oldest)
        state.oldest = _NONE_YET

    def _used(self, limit: Limit, now: float) -> tuple[int, int]:
        """Tokens in the window and the current period, where the limit counts them."""
        state = self._keys.get(limit.key)
        if state is None:
            return 0, 0
        in_window = in_period = 0
        if limit.tokens_per_minute is not None:
            self._trim(state, math.floor(now))
            in_window = state.total
        if limit.token_quota is not None:
            in_period = self._count(state, limit, now).used
        return in_window, in_period

    def _sweep(self, now: float) -> None:
        """Forget idle keys (no live bucket) and counters a day past their period's end."""
        self._next_sweep = now + SWEEP_EVERY
        second = math.floor(now)
        for key, state in list(self._keys.items()):
            self._trim(state, second)
            if not state.buckets:
                del self._keys[key]
        for ck in [ck for ck, c in self._counts.items() if c.end + KEEP_PERIOD < now]:
            del self._counts[ck]
