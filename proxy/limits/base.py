"""The token-limit store interface and the pure arithmetic every store shares (SPEC §6).

A `Limiter` keeps, per resolved counter key, a 60-second sliding rate window in 1-second
buckets and one counter per UTC quota period. `admit` reserves tokens against both in one
atomic step, `settle` replaces a reservation by the real usage, `release` gives it back.

Rules every store follows (tests/test_limits.py proves them against each one):

- The window at time `now` holds the 61 buckets whose second `b` satisfies
  `floor(now) - 60 <= b <= floor(now)`; a bucket charged at second `b` leaves it at `b + 61`.
  One bucket more than 60 because a bucket stands for a whole second: two charges less than
  60 s apart (0.9 s and 60.0 s) are in buckets 60 apart, and must still see each other for
  "never more than tokens-per-minute in any 60-second interval" to hold to the microsecond.
- The quota is checked before the rate: a quota refusal (403) is the more lasting answer.
- A refusal changes nothing. An admission charges `bucket[now]` and the period counter.
- Only what a limit limits is counted: no window without `tokens_per_minute`, no period
  counter without `token_quota`.
- `settle` with less than reserved returns the difference to the bucket and period the
  reservation was charged in (while the bucket is still in the window, never below 0); usage
  beyond the reservation is charged to `bucket[now]` and the current period.

This module imports nothing from proxy and no Redis.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import msgspec

WINDOW = 60  # seconds in the sliding rate window
LEAVES = WINDOW + 1  # a bucket charged at second b leaves the window at b + LEAVES
PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")


class StoreUnavailableError(Exception):
    """The store could not answer (connection refused or lost, timeout, cluster down).

    The caller applies `store-failure-mode`; the store itself reconnects on the next call.
    """


# The values below are msgspec Structs: made on every admission, they cost ~0.14 us each
# where a frozen dataclass costs ~0.7 us. The ones made per request are not tracked by the
# garbage collector (gc=False): nothing they refer to refers back to them (a store's `held`
# handle is its key state or lease, which keep no reservation), so they are in no cycle.


class Limit(msgspec.Struct, frozen=True):
    """One `llm-token-limit` policy as resolved for a request."""

    key: str  # resolved counter key, e.g. "team-a"
    tokens_per_minute: int | None
    token_quota: int | None
    quota_period: str = "monthly"


class Reservation(msgspec.Struct, frozen=True, gc=False):
    """An admission: what it reserved, where (what `settle`/`release` need), and what the
    window and the quota had left after it. One Struct, not a reservation inside an answer:
    every admitted request makes one."""

    limit: Limit
    tokens: int
    second: int  # the window bucket (unix second) charged
    period: str  # quota period id, e.g. "2026-11" ("" when no quota)
    store: Limiter  # the store that holds it (a failure-mode fallback may differ)
    remaining_tokens: int | None = None  # after the admission (None: not limited)
    remaining_quota: int | None = None
    held: Any = None  # the store's own handle on what it charged (never read by callers)


class Refused(msgspec.Struct, frozen=True, gc=False):
    reason: Literal["rate", "quota"]
    retry_after: float  # seconds
    remaining_tokens: int | None
    remaining_quota: int | None


Failed = Callable[[BaseException], None]  # told why a settlement sent with settle_soon failed


class Limiter(Protocol):
    """A token-limit store; see the module docstring for the rules."""

    async def admit(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused:
        """Reserve `tokens` against the window and the quota, or refuse and change nothing.

        With `most` > `tokens`, reserve up to `most` where there is room (see `grant`): the
        reservation's `tokens` say how many were taken. proxy/limits/lease.py asks so."""
        ...

    def admit_now(self, limit: Limit, tokens: int) -> Reservation | Refused | None:
        """`admit`, answered without waiting where the store can (in process: the memory
        store, an open lease); None where it cannot, and then the caller awaits `admit`.
        The handler's path: a coroutine per admission costs more than the admission."""
        ...

    async def settle(self, reservation: Reservation, used: int) -> tuple[int | None, int | None]:
        """Replace the reservation by `used`; return the remaining tokens and quota after."""
        ...

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None
    ) -> None:
        """`settle` without waiting for it: applied at once (memory) or sent with the loop
        turn's other settlements (Redis). `failed` hears of a store that could not take it."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Give the whole reservation back (`settle` with 0)."""
        ...

    async def usage(self, limit: Limit) -> tuple[int, int]:
        """Tokens in the current window and used in the current quota period."""
        ...

    async def close(self) -> None: ...


# The last bounds computed per period kind: a memo of the pure function below, which every
# admission calls and which otherwise costs ~10 us of datetime arithmetic.
_recent: dict[str, tuple[str, float, float]] = {}


def period_bounds(period: str, now: float) -> tuple[str, float, float]:
    """The UTC calendar period containing `now`: (id, start, end) with unix-time bounds.

    Ids: hourly "2026-11-26T09", daily "2026-11-26", weekly "2026-W48" (ISO week, from
    Monday 00:00), monthly "2026-11", yearly "2026".
    """
    hit = _recent.get(period)
    if hit is not None and hit[1] <= now < hit[2]:
        return hit
    bounds = _period_bounds(period, now)
    _recent[period] = bounds
    return bounds


def _period_bounds(period: str, now: float) -> tuple[str, float, float]:
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "hourly":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%dT%H"), start.timestamp(), start.timestamp() + 3600
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        end = day + dt.timedelta(days=1)
        return day.strftime("%Y-%m-%d"), day.timestamp(), end.timestamp()
    if period == "weekly":
        year, week, weekday = day.isocalendar()
        start = day - dt.timedelta(days=weekday - 1)
        end = start + dt.timedelta(days=7)
        return f"{year}-W{week:02d}", start.timestamp(), end.timestamp()
    if period == "monthly":
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        return start.strftime("%Y-%m"), start.timestamp(), end.timestamp()
    if period == "yearly":
        start = day.replace(month=1, day=1)
        end = start.replace(year=start.year + 1)
        return start.strftime("%Y"), start.timestamp(), end.timestamp()
    raise ValueError(f"unknown quota period {period!r}; expected one of {', '.join(PERIODS)}")


def rate_retry_after(
    buckets: Iterable[tuple[int, int]], used: int, tokens: int, tpm: int, now: float
) -> float:
    """Seconds until `tokens` fit the window: until the oldest buckets that must leave have.

    `buckets` are the (second, tokens) pairs in the window at `now`, summing to `used`.
    More tokens than the limit never fit: 60 s, which callers turn into a clear message.
    proxy/limits/lua/admit.lua mirrors this in microseconds.
    """
    if tokens > tpm:
        return float(WINDOW)
    excess = used + tokens - tpm
    freed = 0
    for second, count in sorted(buckets):
        freed += count
        if freed >= excess:
            return max(0.0, second + LEAVES - now)
    return 0.0


# A grant beyond what an admission needs takes at most this share of the room left after it,
# so the leases of many processes (proxy/limits/lease.py) never hold most of a limit.
GRANT_SHARE = 16


def grant(tokens: int, most: int, room: int | None) -> int:
    """What an admission of `tokens` that may take up to `most` reserves, when `room` (the
    least of what the window and the quota have left; None when neither is limited) fits
    `tokens`: the extra is capped at 1/GRANT_SHARE of the room left after `tokens`.
    proxy/limits/lua/admit.lua mirrors this."""
    if most <= tokens:
        return tokens
    if room is None:
        return most
    return tokens + max(0, min(most - tokens, (room - tokens) // GRANT_SHARE))


def remaining(limit: Limit, in_window: int, in_period: int) -> tuple[int | None, int | None]:
    """What is left of the rate and of the quota (never negative; None where not limited)."""
    tpm, quota = limit.tokens_per_minute, limit.token_quota
    return (
        None if tpm is None else max(0, tpm - in_window),
        None if quota is None else max(0, quota - in_period),
    )
