"""The in-process token-limit store: the rules of `proxy.limits.base`, exact within one process.

Each decision runs without an `await`, so on one event loop it is atomic. State per counter
key: a dict second -> tokens (at most 61 live buckets, trimmed on every touch) and one counter
per quota period. A sweep at most once a minute drops windows with no live bucket and period
counters a day past their period's end, so idle keys do not accumulate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.limits.base import (
    LEAVES,
    Admitted,
    Failed,
    Limit,
    Refused,
    Reservation,
    period_bounds,
    rate_retry_after,
    remaining,
)

SWEEP_EVERY = 60.0  # seconds of clock time between sweeps
KEEP_PERIOD = 86400.0  # a period counter outlives its period by a day, like its Redis key


@dataclass(slots=True)
class _Count:
    used: int
    end: float  # the period's end (unix time)


class MemoryLimiter:
    """Per-process counters; `clock` (default `time.time`) lets tests drive time."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, dict[int, int]] = {}  # buckets in the order they were made
        self._totals: dict[str, int] = {}  # each window's sum, kept as buckets change
        self._counts: dict[tuple[str, str], _Count] = {}
        self._next_sweep = 0.0

    async def admit(self, limit: Limit, tokens: int) -> Admitted | Refused:
        now = self._clock()
        self._sweep(now)
        second = math.floor(now)
        tpm, quota = limit.tokens_per_minute, limit.token_quota
        window = self._window(limit.key, second)
        used = self._totals.get(limit.key, 0) if window else 0
        period, _, end = period_bounds(limit.quota_period, now) if quota is not None else ("", 0, 0)
        count = self._counts.get((limit.key, period))
        quota_used = count.used if count else 0
        if quota is not None and quota_used + tokens > quota:
            return Refused("quota", end - now, *remaining(limit, used, quota_used))
        if tpm is not None and used + tokens > tpm:
            retry_after = rate_retry_after(window.items(), used, tokens, tpm, now)
            return Refused("rate", retry_after, *remaining(limit, used, quota_used))
        self._charge(limit, tokens, second, now)
        reservation = Reservation(limit, tokens, second, period, self)
        return Admitted(reservation, *remaining(limit, used + tokens, quota_used + tokens))

    async def settle(self, reservation: Reservation, used: int) -> tuple[int | None, int | None]:
        now = self._settle(reservation, used)
        return remaining(reservation.limit, *self._used(reservation.limit, now))

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None
    ) -> None:
        self._settle(reservation, used)  # at once: this store cannot fail

    def _settle(self, reservation: Reservation, used: int) -> float:
        now = self._clock()
        second = math.floor(now)
        limit, delta = reservation.limit, used - reservation.tokens
        if delta < 0:
            self._refund(reservation, -delta, second)
        elif delta > 0:
            self._charge(limit, delta, second, now)
        return now

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        return self._used(limit, self._clock())

    async def close(self) -> None:
        self._windows.clear()
        self._totals.clear()
        self._counts.clear()

    def _window(self, key: str, second: int) -> dict[int, int]:
        """The key's live buckets at `second` (stale ones dropped); empty when it has none.

        Buckets are made in time order, so the stale ones are at the front: trimming looks
        at the oldest only (a clock stepping back can leave one stale bucket a little
        longer: an over-count, never an under-count)."""
        window = self._windows.get(key)
        if window is None:
            return {}
        horizon = second - LEAVES
        while window:
            oldest = next(iter(window))
            if oldest > horizon:
                break
            self._totals[key] -= window.pop(oldest)
        return window

    def _used(self, limit: Limit, now: float) -> tuple[int, int]:
        """Tokens in the window and the current period, where the limit counts them."""
        in_window, in_period = 0, 0
        if limit.tokens_per_minute is not None and self._window(limit.key, math.floor(now)):
            in_window = self._totals[limit.key]
        if limit.token_quota is not None:
            count = self._counts.get((limit.key, period_bounds(limit.quota_period, now)[0]))
            in_period = count.used if count else 0
        return in_window, in_period

    def _charge(self, limit: Limit, tokens: int, second: int, now: float) -> None:
        """Add tokens to `bucket[second]` and the current period, where the limit counts them."""
        if limit.tokens_per_minute is not None:
            key = limit.key
            window = self._windows.setdefault(key, {})
            window[second] = window.get(second, 0) + tokens
            self._totals[key] = self._totals.get(key, 0) + tokens
        if limit.token_quota is not None:
            period, _, end = period_bounds(limit.quota_period, now)
            self._counts.setdefault((limit.key, period), _Count(0, end)).used += tokens

    def _refund(self, reservation: Reservation, tokens: int, second: int) -> None:
        """Return tokens to the reservation's bucket (if still live) and period, not below 0."""
        key = reservation.limit.key
        window = self._windows.get(key)
        if window and reservation.second in window and reservation.second > second - LEAVES:
            back = min(tokens, window[reservation.second])
            window[reservation.second] -= back
            self._totals[key] -= back
        count = self._counts.get((key, reservation.period)) if reservation.period else None
        if count:
            count.used = max(0, count.used - tokens)

    def _sweep(self, now: float) -> None:
        """Forget idle keys: windows without a live bucket, counters a day past their period."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        horizon = math.floor(now) - LEAVES
        for key in [k for k, w in self._windows.items() if all(b <= horizon for b in w)]:
            del self._windows[key]
            self._totals.pop(key, None)
        for ck in [ck for ck, c in self._counts.items() if c.end + KEEP_PERIOD < now]:
            del self._counts[ck]
