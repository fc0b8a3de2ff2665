"""A backend's circuit breaker (SPEC §3 `circuit-breaker`): closed → tripped → half-open.

Closed, every request goes through and its outcome is recorded. A *failure* is a response
whose status is in one of `status-code-ranges`, or an error whose reason (`timeout`,
`connection`) is in `error-reasons`. The breaker trips when, within the last `interval`,

- `count`: at least `count` requests failed (kept exactly: the times of the last `count`
  failures), or
- `percentage`: at least `percentage` % of the requests failed, once `min-requests` were
  seen (kept in ten buckets of `interval / 10`).

Tripped, the backend gets no requests for `trip-duration` — or, with `accept-retry-after`,
for as long as the Retry-After of the response that tripped it says. Then it is half-open:
one request (the probe) goes through; its success closes the breaker, its failure trips it
again. A probe that ends without an outcome (the client went away) frees the slot for the
next one.

Pure state with the clock passed in, so tests drive time; `SharedBreakers`
(proxy/breakers_shared.py) spreads trips across gateway processes.
"""

from __future__ import annotations

import collections
from typing import Literal

from proxy.config import CircuitBreaker

Reason = Literal["timeout", "connection"]
BUCKETS = 10  # percentage mode: the interval's resolution


class Breaker:
    """One backend's breaker; see the module docstring."""

    __slots__ = (
        "_buckets", "_by_count", "_failures", "_probing", "_ranges", "_reasons", "backend_id",
        "counts_successes", "rule", "trips", "until",
    )  # fmt: skip

    def __init__(self, backend_id: str, rule: CircuitBreaker):
        self.backend_id = backend_id
        self.rule = rule
        condition = rule.failure_condition
        self._ranges = tuple((r.min, r.max) for r in condition.status_code_ranges)
        self._reasons = frozenset(condition.error_reasons)
        self._by_count = condition.count is not None
        self.counts_successes = not self._by_count  # a count rule's successes change nothing
        # count: times of the latest failures; percentage: [start, total, failed] buckets
        self._failures: collections.deque[float] = collections.deque(maxlen=condition.count or 1)
        self._buckets: collections.deque[list[float]] = collections.deque(maxlen=BUCKETS)
        self.until = 0.0  # tripped until this (monotonic) time; 0 when closed
        self._probing = False  # half-open: the probe is out
        self.trips = 0

    # -- asking -----------------------------------------------------------------------------

    def state(self, now: float) -> Literal["closed", "open", "half-open"]:
        if not self.until:
            return "closed"
        return "open" if now < self.until else "half-open"

    def available(self, now: float) -> bool:
        """Whether a request may go now (a half-open breaker: if its probe is not out)."""
        until = self.until
        return not until or (now >= until and not self._probing)

    def reopens_in(self, now: float) -> float:
        """Seconds until a request may go again (0 when it may go now)."""
        if self.available(now):
            return 0.0
        return max(self.until - now, 0.0) or 1.0  # a probe is out: ask again in a second

    def take(self, now: float) -> bool:
        """Let one request through (after `available`); True when it is the probe."""
        if self.until and now >= self.until:
            self._probing = True
            return True
        return False

    def failure_status(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self._ranges)

    def failure_reason(self, reason: Reason) -> bool:
        return reason in self._reasons

    # -- recording --------------------------------------------------------------------------

    def record(
        self, now: float, failed: bool, probe: bool, retry_after: float | None = None
    ) -> float:
        """Record one outcome; returns the trip's duration in seconds if this tripped it, else 0."""
        if probe:
            self._probing = False
            if not failed:
                self._reset()
                return 0.0
            return self._trip(now, retry_after)
        if self.until:  # outcomes of requests sent before the trip change nothing
            return 0.0
        if self._by_count:
            if not failed:
                return 0.0
            failures = self._failures
            failures.append(now)
            horizon = now - self.rule.failure_condition.interval
            if len(failures) == failures.maxlen and failures[0] > horizon:
                return self._trip(now, retry_after)
            return 0.0
        return self._trip(now, retry_after) if self._count_share(now, failed) else 0.0

    def abandon(self, probe: bool) -> None:
        """The request ended without an outcome (cancelled): free the probe slot."""
        if probe:
            self._probing = False

    def trip_for(self, now: float, seconds: float) -> None:
        """Trip (or extend a trip) from outside: another gateway process tripped it."""
        until = now + seconds
        if until > self.until:
            self.until = until
            self._failures.clear()
            self._buckets.clear()

    def _count_share(self, now: float, failed: bool) -> bool:
        condition = self.rule.failure_condition
        width = condition.interval / BUCKETS
        buckets = self._buckets
        if not buckets or now - buckets[-1][0] >= width:
            buckets.append([now, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        if failed:
            bucket[2] += 1
        else:
            return False
        horizon = now - condition.interval
        total = failures = 0.0
        for start, seen, bad in buckets:
            if start > horizon:
                total += seen
                failures += bad
        assert condition.percentage is not None
        return total >= condition.min_requests and failures * 100 >= condition.percentage * total

    def _trip(self, now: float, retry_after: float | None) -> float:
        seconds = float(self.rule.trip_duration)
        if retry_after is not None and self.rule.accept_retry_after:
            seconds = max(retry_after, 0.001)
        self.until = now + seconds
        self.trips += 1
        self._failures.clear()
        self._buckets.clear()
        return seconds

    def _reset(self) -> None:
        self.until = 0.0
        self._failures.clear()
        self._buckets.clear()
