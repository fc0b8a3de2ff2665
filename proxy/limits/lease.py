"""Leases: a process's local share of the shared store's current second.

An admission in the shared store is a round trip (~0.12 ms of wall time on this machine, and
a wake-up of the store and of the worker). `LeasingLimiter` makes most admissions without
one. Per counter key it holds a lease: one admission in the store that took more than the
request needed (what the process drew in its last second, doubling within a second while
that is not enough), charged to the store's current 1-s bucket and quota period like any
reservation. Requests draw on it in process until that second ends by the store's clock;
then the lease closes: one settlement gives back what was not drawn, and a new lease starts
with the next request. Settlements of requests drawn from a lease that is still open go to
it (a refund can be drawn again, up to what the lease may hold undrawn; the rest goes back to
the store at once); after it closed, to the store.

Why this stays exact: the store's window always holds at least what every process admitted,
in the very bucket it was admitted in (a lease is drawn on only while that bucket is the
store's current second, counted from before the store read its clock), so "never more than
tokens-per-minute in any 60 s" holds as before. The price: what a lease holds and does not
draw (at most 1/GRANT_SHARE of the room left when it was taken, base.grant) counts as used
for the other processes until its second ends, so near a limit another process can be
refused a request that would have fit — an over-count, never an under-count. Within one
process nothing changes: its own lease is drawn on first.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

from proxy.limits.base import (
    Failed,
    Limit,
    Refused,
    Reservation,
)

MAX_TRIES = 3  # top-ups a request makes before it is admitted exactly, without a lease
SWEEP_EVERY = 0.1  # seconds between closings of leases whose second has ended
FORGET_AFTER = 60.0  # a key's demand is forgotten after this long without a lease


class SharedStore(Protocol):
    """What a lease is taken from: a `Limiter` that also says how long the bucket it charged
    stays the store's current second (RedisLimiter, FailoverLimiter)."""

    async def admit_for(
        self, limit: Limit, tokens: int, most: int = 0
    ) -> tuple[Reservation | Refused, float]: ...

    async def admit(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused: ...

    def admit_now(self, limit: Limit, tokens: int) -> Reservation | Refused | None: ...

    async def settle(
        self, reservation: Reservation, used: int
    ) -> tuple[int | None, int | None]: ...

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None
    ) -> None: ...

    async def release(self, reservation: Reservation) -> None: ...

    async def usage(self, limit: Limit) -> tuple[int, int]: ...

    async def close(self) -> None: ...


class _Lease:
    """Tokens taken from the store in one bucket, drawn on by this process's requests."""

    __slots__ = (
        "closed",
        "drawn",
        "grant",
        "granted",
        "keep",
        "left",
        "opened",
        "quota_rest",
        "rate_rest",
        "until",
    )  # fmt: skip

    def __init__(self, grant: Reservation, asked: int, opened: float, until: float) -> None:
        self.grant = grant  # the store's bucket and period (its tokens: `granted`)
        self.granted = self.left = self.grant.tokens
        self.keep = self.granted - asked  # the most it may hold undrawn: what base.grant allowed
        self.drawn = 0
        self.opened, self.until = opened, until
        self.closed = False
        # what the store had left besides this lease when it was (last) topped up
        self.rate_rest = grant.remaining_tokens
        self.quota_rest = grant.remaining_quota

    def draw(self, limit: Limit, tokens: int, owner: LeasingLimiter) -> Reservation:
        self.left = left = self.left - tokens
        self.drawn += tokens
        grant = self.grant
        # (no _plus: the rests and `left` are >= 0 here, and this runs on every request)
        rate, quota = self.rate_rest, self.quota_rest
        return Reservation(
            limit, tokens, grant.second, grant.period, owner,
            None if rate is None else rate + left, None if quota is None else quota + left, self,
        )  # fmt: skip

    def held(self, tokens: int | None = None, limit: Limit | None = None) -> Reservation:
        """A reservation in the store, in the lease's bucket and period: by default the whole
        lease (all it was granted); else `tokens` of it (under `limit`, a request's)."""
        grant = self.grant
        return Reservation(limit or grant.limit, self.granted if tokens is None else tokens,
                           grant.second, grant.period, grant.store)  # fmt: skip


class _Key:
    """One counter key's current lease and its recent demand."""

    __slots__ = ("idle_since", "late", "lease", "rate", "topping")

    def __init__(self) -> None:
        self.lease: _Lease | None = None
        self.late: list[_Lease] = []  # grants for a second already gone, to be closed
        self.rate = 0.0  # tokens drawn per second, from the leases that closed
        self.topping: asyncio.Event | None = None  # set when the top-up in flight answers
        self.idle_since = 0.0


class LeasingLimiter:
    """A shared store behind per-process leases (see the module docstring).

    `clock` must tick in seconds like the store's (tests pass the store's fake clock)."""

    def __init__(self, store: SharedStore, *, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def admit(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused:
        drawn = self.admit_now(limit, tokens)
        if drawn is not None:
            return drawn
        state = self._keys.get(limit.key)
        if state is None:
            state = self._keys[limit.key] = _Key()
        return await self._top_up(state, limit, tokens)

    def admit_now(self, limit: Limit, tokens: int) -> Reservation | None:
        """A draw on the key's open lease when it covers `tokens`; else None (a top-up)."""
        state = self._keys.get(limit.key)
        if state is not None:
            lease = state.lease
            if (
                lease is not None
                and lease.left >= tokens
                and (lease.grant.limit is limit or lease.grant.limit == limit)
                and self._clock() < lease.until
            ):
                return lease.draw(limit, tokens, self)
        return None

    async def _top_up(self, state: _Key, limit: Limit, tokens: int) -> Reservation | Refused:
        """Take a lease (or more of the current one) from the store, and draw on it.

        A lease with a few tokens left that do not cover the request closes first (they go
        back in the same round trip, ahead of the admission), so the process's own undrawn
        tokens never refuse it; an exhausted one is extended by a grant in its second. A
        reply for a second that has ended meanwhile asks again (rare).

        One request at a time asks, for the key's demand; the others wait for its answer and
        draw on it (so a new second under load costs one round trip, not one per request in
        flight), then ask themselves if it does not cover them. Waiting is not a try: each
        wait ends with another request's try, and those are bounded."""
        tries = 0
        while tries < MAX_TRIES:
            sent = self._clock()
            current = state.lease
            if current is not None:
                valid = sent < current.until and current.grant.limit == limit
                if valid and current.left >= tokens:  # another request topped it up
                    return current.draw(limit, tokens, self)
                if not valid or current.left:
                    self._close(state, current)
                    current = None
            flight = state.topping
            if flight is not None:  # another request is asking: wait for it, then look again
                await flight.wait()
                continue
            tries += 1
            extra = state.rate if current is None else max(state.rate, current.granted)
            state.topping = flight = asyncio.Event()
            try:
                decision, lasts = await self.store.admit_for(
                    limit, tokens, tokens + math.ceil(extra)
                )
            finally:
                state.topping = None
                flight.set()
            if isinstance(decision, Refused):
                return decision
            lease = self._lease(state, limit, decision, tokens, sent, sent + lasts)
            if lease.left >= tokens:
                return lease.draw(limit, tokens, self)
        # Seconds kept ending under the replies: admit exactly, as a lease closed at once.
        decision, _ = await self.store.admit_for(limit, tokens)
        if isinstance(decision, Refused):
            return decision
        lease = _Lease(decision, tokens, 0.0, 0.0)
        admitted = lease.draw(limit, tokens, self)
        self._close(state, lease)
        return admitted

    def _lease(
        self, state: _Key, limit: Limit, grant: Reservation, asked: int, sent: float, until: float
    ) -> _Lease:
        """The lease a grant joins (the current one, same bucket) or starts; a grant for a
        second already gone is a lease closed at once."""
        current = state.lease  # what the others did meanwhile
        if (
            current is not None
            and not current.closed
            and current.grant.store is grant.store
            and current.grant.second == grant.second
            and current.grant.period == grant.period
            and current.grant.limit == limit
        ):
            current.granted += grant.tokens
            current.left += grant.tokens
            current.keep += grant.tokens - asked
            current.rate_rest = grant.remaining_tokens  # the store counts all of it drawn
            current.quota_rest = grant.remaining_quota
            return current
        lease = _Lease(grant, asked, sent, until)
        if current is None or current.closed or _newer(grant, current.grant):
            if current is not None:
                self._close(state, current)
            state.lease = lease
            self._sweep_soon()
        else:  # drawn on by its own request only, then closed by the sweep
            lease.until = 0.0
            state.late.append(lease)
            self._sweep_soon()
        return lease

    async def settle(self, reservation: Reservation, used: int) -> tuple[int | None, int | None]:
        lease = reservation.held
        if isinstance(lease, _Lease) and self._open(lease):
            self.settle_soon(reservation, used)  # into the lease
            return _plus(lease.rate_rest, lease.left), _plus(lease.quota_rest, lease.left)
        return await self.store.settle(self._direct(reservation), used)

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None
    ) -> None:
        """A request drawn from a lease that is still open settles into it: the difference
        is the lease's (drawn beyond it, settled when it closes; or given back to be drawn
        again). What a refund would leave undrawn beyond what the lease may hold goes back to
        the store at once, so refunds never make a lease hold more than base.grant allowed.
        Otherwise the settlement is the store's, in the lease's bucket."""
        lease = reservation.held
        if not (isinstance(lease, _Lease) and self._open(lease)):
            self.store.settle_soon(self._direct(reservation), used, failed)
            return
        delta = used - reservation.tokens
        lease.drawn += delta
        left = lease.left - delta
        if left > lease.keep:
            back = left - lease.keep
            self.store.settle_soon(lease.held(back), 0)
            lease.granted -= back
            left = lease.keep
            if lease.rate_rest is not None:
                lease.rate_rest += back
            if lease.quota_rest is not None:
                lease.quota_rest += back
        lease.left = left

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        """The store's totals, less what this process's open lease holds undrawn (plus what
        was drawn beyond it)."""
        state = self._keys.get(limit.key)
        lease = state.lease if state is not None else None
        if lease is not None and not self._open(lease):
            lease = None
        in_window, in_period = await self.store.usage(limit)
        if lease is not None and not lease.closed and lease.grant.limit == limit:
            left = lease.left
            in_window = max(0, in_window - left) if limit.tokens_per_minute is not None else 0
            in_period = max(0, in_period - left) if limit.token_quota is not None else 0
        return in_window, in_period

    async def close(self) -> None:
        """Give every open lease's undrawn tokens back, then close the store."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for state in self._keys.values():
            for lease in (*state.late, state.lease):
                if lease is not None and not lease.closed:
                    lease.closed = True
                    if lease.drawn != lease.granted:
                        await self.store.settle(lease.held(), max(0, lease.drawn))
            state.lease = None
            state.late.clear()
        self._keys.clear()
        await self.store.close()

    @staticmethod
    def _direct(reservation: Reservation) -> Reservation:
        """A request's reservation as the store's own: its tokens in the lease's bucket."""
        lease = reservation.held
        if not isinstance(lease, _Lease):
            return reservation
        return lease.held(reservation.tokens, reservation.limit)

    def _open(self, lease: _Lease) -> bool:
        """Is `lease` still drawn on? One whose second has ended is closed here."""
        if lease.closed:
            return False
        if self._clock() < lease.until:
            return True
        state = self._keys.get(lease.grant.limit.key)
        self._close(state, lease)
        return False

    def _close(self, state: _Key | None, lease: _Lease) -> None:
        """End a lease: settle its grant with what was drawn (undrawn tokens go back), and
        learn the key's demand from it."""
        if lease.closed:
            return
        lease.closed = True
        if state is not None and state.lease is lease:
            state.lease = None
            now = self._clock()
            state.idle_since = now
            rate = lease.drawn / max(0.05, now - lease.opened)
            state.rate = rate if not state.rate else (state.rate + rate) / 2
        if lease.drawn != lease.granted:
            self.store.settle_soon(lease.held(), max(0, lease.drawn))

    def _sweep_soon(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    def _sweep(self) -> None:
        """Close the leases whose second has ended; forget keys idle for FORGET_AFTER."""
        self._sweeper = None
        now = self._clock()
        open_ = False
        for key, state in list(self._keys.items()):
            lease = state.lease
            if lease is not None and now >= lease.until:
                self._close(state, lease)
            for late in state.late:
                self._close(None, late)
            state.late.clear()
            if state.lease is not None:
                open_ = True
            elif now - state.idle_since > FORGET_AFTER and state.topping is None:
                del self._keys[key]
        if open_:
            self._sweep_soon()


def _newer(a: Reservation, b: Reservation) -> bool:
    return (a.second, a.period) > (b.second, b.period)


def _plus(rest: int | None, left: int) -> int | None:
    """What is left as this process sees it: the store's rest and its lease's undrawn."""
    return None if rest is None else max(0, rest + left)
