"""`store-failure-mode` (SPEC §3, §6): what token limits do while the shared store is down.

`FailoverLimiter` wraps the shared store. While it answers, every call goes to it. When it
fails (`StoreUnavailableError`), the limiter is *degraded* until the store answers again:

- `open`: requests are admitted against a per-process `MemoryLimiter` — limits still hold
  per process, not across processes — and the gateway says so: one log line when it
  degrades and one when it recovers, `degraded` for `/readyz`, `fallback_admissions` counted;
- `closed`: requests under a token limit are refused with 503 `StoreUnavailable`.

While degraded, the store is tried again at most once per `retry_interval` (so an outage
costs one connection attempt per interval, not one per request); the first success
recovers, without a restart. A reservation settles in the store that made it; a settlement
the store could not take is kept (up to `MAX_PENDING`) and replayed when it answers again,
so an outage leaves no reservation behind in a store that kept its data. A settlement that
timed out may have run all the same (a hung server runs what was in its socket when it
resumes), so each carries an id that makes the store apply it once (settle.lua's "once"
key): a replay never gives tokens back twice.

One ambiguity remains, counted in `failed_admissions`: an admission that timed out against a
hung server may still run when the server resumes (Redis reads what was already in its
socket buffers), leaving that reservation in the shared window — an over-count, never an
under-count, and gone from the rate window after 61 s (a quota keeps it for its period).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from proxy.errors import TokenStoreUnavailableError
from proxy.limits.base import (
    Failed,
    Limit,
    Refused,
    Reservation,
    StoreUnavailableError,
)
from proxy.limits.lease import SharedStore
from proxy.limits.memory import MemoryLimiter

log = logging.getLogger("tollway")

MAX_PENDING = 100_000  # settlements kept for replay while the store is away


class ReplayableStore(SharedStore, Protocol):
    """A shared store whose settlements take an id (`once`) that makes one sent twice apply
    once (RedisLimiter)."""

    async def settle(
        self, reservation: Reservation, used: int, once: str = ""
    ) -> tuple[int | None, int | None]: ...

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None, once: str = ""
    ) -> None: ...


class FailoverLimiter:
    """A shared store with the configured failure mode (see the module docstring)."""

    def __init__(
        self,
        store: ReplayableStore,
        mode: str = "open",
        *,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.mode = mode
        self.fallback = MemoryLimiter()
        self.degraded = False
        self.fallback_admissions = 0
        self.failed_admissions = 0  # admissions the store did not answer (see the docstring)
        self.failed_tokens = 0  # the most they could have reserved
        self._retry_interval = retry_interval
        self._clock = clock
        self._next_try = 0.0
        self._replaying = False
        self._pending: collections.deque[tuple[Reservation, int, str]] = collections.deque(
            maxlen=MAX_PENDING
        )
        # settlement ids: unique to this limiter (a random prefix), then counted
        self._id_prefix = secrets.token_hex(8) + "."
        self._ids = itertools.count()

    async def admit(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused:
        return (await self.admit_for(limit, tokens, most))[0]

    def admit_now(self, limit: Limit, tokens: int) -> None:
        """Never: the shared store is asked first, and that waits."""
        return None

    async def admit_for(
        self, limit: Limit, tokens: int, most: int = 0
    ) -> tuple[Reservation | Refused, float]:
        """`admit`, and how long the bucket it charged stays current (proxy/limits/lease.py)."""
        if not self.degraded or self._clock() >= self._next_try:
            try:
                result = await self.store.admit_for(limit, tokens, most)
            except StoreUnavailableError as exc:
                self.failed_admissions += 1
                self.failed_tokens += max(tokens, most)
                self._degrade(exc)
            else:
                self._recover()
                if self._pending:
                    await self._replay()
                return result
        if self.mode == "closed":
            raise TokenStoreUnavailableError()
        self.fallback_admissions += 1
        # Exactly `tokens`, valid for no time: no lease is drawn on the per-process fallback
        # (it costs no round trip), so each admission meanwhile tries the store again.
        return await self.fallback.admit(limit, tokens), 0.0

    async def settle(self, reservation: Reservation, used: int) -> tuple[int | None, int | None]:
        once = self._new_id()
        try:
            return await self._settle(reservation, used, once)
        except StoreUnavailableError as exc:
            self._degrade(exc)
            self._pending.append((reservation, used, once))
            return None, None

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None
    ) -> None:
        once = self._new_id()
        missed = functools.partial(self._missed, reservation, used, once)
        if reservation.store is self.store:
            self.store.settle_soon(reservation, used, missed, once)
        else:  # the per-process fallback's (it cannot fail)
            reservation.store.settle_soon(reservation, used, missed)

    def _settle(
        self, reservation: Reservation, used: int, once: str
    ) -> Awaitable[tuple[int | None, int | None]]:
        """Settle in the store that made the reservation, with the settlement's id when that
        is the shared store."""
        if reservation.store is self.store:
            return self.store.settle(reservation, used, once)
        return reservation.store.settle(reservation, used)

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _missed(self, reservation: Reservation, used: int, once: str, exc: BaseException) -> None:
        """A settlement sent with settle_soon failed: keep it for replay when the store was
        away (anything else is a bug, logged)."""
        if isinstance(exc, StoreUnavailableError):
            self._degrade(exc)
            self._pending.append((reservation, used, once))
        else:
            log.error("token-limit settlement failed for %r: %s: %s",
                      reservation.limit.key, type(exc).__name__, exc)  # fmt: skip

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0)

    async def _replay(self) -> None:
        """Settle what the store missed while it was away, oldest first; stop at a failure.
        One replay at a time, each entry taken off the queue before it is sent, so
        concurrent admissions never settle one reservation twice."""
        if self._replaying:
            return
        self._replaying = True
        pending = self._pending
        try:
            while pending:
                reservation, used, once = pending.popleft()
                try:
                    await self._settle(reservation, used, once)
                except StoreUnavailableError as exc:
                    pending.appendleft((reservation, used, once))
                    self._degrade(exc)
                    return
        finally:
            self._replaying = False

    async def usage(self, limit: Limit) -> tuple[int, int]:
        try:
            return await self.store.usage(limit)
        except StoreUnavailableError as exc:
            self._degrade(exc)
            return await self.fallback.usage(limit)

    async def close(self) -> None:
        await self.store.close()
        await self.fallback.close()

    def _degrade(self, exc: BaseException) -> None:
        self._next_try = self._clock() + self._retry_interval
        if not self.degraded:
            self.degraded = True
            counting = "per-process counters" if self.mode == "open" else "refusing with 503"
            log.error("tollway: token-limit store unavailable (%s); %s until it returns",
                      exc, counting)  # fmt: skip

    def _recover(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("tollway: token-limit store is back; shared counting resumed")
