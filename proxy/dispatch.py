"""Sending a request to a configured backend: member choice, retries, circuit breakers.

`Backends.route(id)` gives the `Route` of a backend id (a single backend is a one-member
pool). `Route.send` makes the attempts:

1. choose a member (proxy/balancer.py): the most preferred available one not yet tried by
   this request; none available at the start → 503 `BackendUnavailable`, with the soonest
   time a breaker lets requests through again as `Retry-After`;
2. send; record the outcome on the member's breaker (proxy/breaker.py);
3. a status in `retry.on-status`, or a connection error (connection refused or reset, or
   connecting timed out), with attempts left, is retried: on another member at once when
   the pool has one, else on the same backend after its Retry-After (up to
   `max-retry-after`; a longer wait returns the backend's own response now) or `interval`.
   A read timeout is not retried: the backend may still be working on the request.

Without a `retry` rule a pool still moves a request that met a 429 or a connection error
to each of its other members once (a backend's 429 is its own rate limit, not the
request's fault); a single backend without one is tried once.

Only a body held in memory is replayed. A streamed passthrough body is sent once; its
request is not retried. Nothing here runs after the first byte of a response went to the
client: the handler relays the `Response` this returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable

from proxy.balancer import Balancer, Member
from proxy.breaker import Breaker
from proxy.config import Backend, CircuitBreaker, Config
from proxy.errors import (
    BackendConnectionError,
    BackendConnectTimeoutError,
    BackendTimeoutError,
    BackendUnavailableError,
)
from proxy.exchange import Exchange
from proxy.http1 import Body, Response
from proxy.sharedbreakers import SharedBreakers
from proxy.telemetry import genai
from proxy.telemetry.metrics import Gauge
from proxy.units import retry_after_delay
from proxy.upstream import Upstream

log = logging.getLogger("tollway")

_POOL_DEFAULT_ON = (429,)
_Point = tuple[tuple[tuple[str, object], ...], int]  # a Gauge point: attributes, value


class Route:
    """How requests for one configured backend id reach a backend."""

    def __init__(self, backend: Backend, members: list[Member], health: BackendHealth):
        self.balancer = Balancer(members)
        # Never forwarded from the client: what any member's own credentials are sent in.
        self.credential_headers = frozenset(
            m.upstream.credential_header for m in members if m.upstream.credential_header
        )
        retry = backend.retry
        if retry is not None:
            self._extra, self._on = retry.count, frozenset(retry.on_status)
            self._interval = float(retry.interval or 0.0)
            self._max_wait = float(retry.max_retry_after)
            self._same_again = True
        else:  # see the module docstring
            self._extra, self._on = len(members) - 1, frozenset(_POOL_DEFAULT_ON)
            self._interval = self._max_wait = 0.0
            self._same_again = False
        self._health = health

    async def send(
        self,
        exchange: Exchange,
        method: str,
        subpath: str,
        query: str,
        headers: bytes,
        body: Body,
        length: int | None = None,
    ) -> Response:
        """Send `method` to `subpath` (confined, percent-encoded) with `query` and the
        client's `headers` lines, on the route's members; the caller must close the response.

        Raises BackendUnavailableError, BackendConnectionError or BackendTimeoutError.
        """
        extra = self._extra if body is None or isinstance(body, bytes) else 0
        balancer = self.balancer
        tried: list[Member] = []
        attempt = 0
        while True:
            now = time.monotonic()
            member = balancer.choose(now, tried)
            if member is None and tried:
                member = balancer.choose(now)  # nothing else: the same backend again
            if member is None:
                raise BackendUnavailableError(retry_after=balancer.soonest(now))
            exchange.backend_id = member.upstream.id
            try:
                response = await self._send_once(
                    member, method, subpath, query, headers, body, length
                )
            except (BackendConnectionError, BackendConnectTimeoutError) as exc:
                wait = self._wait_before_retry(member, tried, None) if attempt < extra else None
                if wait is None:
                    raise
                outcome: int | str = exc.code
            else:
                if response.status not in self._on or attempt >= extra:
                    return response
                wait = self._wait_before_retry(member, tried, response)
                if wait is None:
                    return response
                response.close()
                outcome = response.status
            self._retrying(exchange, member, attempt, outcome, tried)
            attempt += 1
            if wait:
                await asyncio.sleep(wait)
                exchange.backend_seconds += wait

    async def _send_once(
        self,
        member: Member,
        method: str,
        subpath: str,
        query: str,
        headers: bytes,
        body: Body,
        length: int | None,
    ) -> Response:
        """One attempt, its outcome recorded on the member's breaker."""
        upstream, breaker = member.upstream, member.breaker
        target = upstream.target(subpath, query)
        headers += upstream.credential_line
        if breaker is None:
            return await upstream.send(method, target, headers, body, length)
        probe = breaker.take(time.monotonic())
        record = self._health.record
        try:
            response = await upstream.send(method, target, headers, body, length)
        except BackendTimeoutError:  # connecting or reading
            record(breaker, probe, breaker.failure_reason("timeout") or None)
            raise
        except BackendConnectionError:
            record(breaker, probe, breaker.failure_reason("connection") or None)
            raise
        except BaseException:
            breaker.abandon(probe)
            raise
        if breaker.failure_status(response.status):
            record(breaker, probe, True, _retry_after(response))
        elif probe or breaker.counts_successes:
            record(breaker, probe, False)
        return response

    async def fetch(
        self, subpath: str, query: str, headers: bytes, body: bytes
    ) -> tuple[int, bytes]:
        """POST `body` for the gateway's own use (embeddings, content safety) and read the
        whole answer: `(status, body)`. Its own record: the route notes the member it chose
        on it, and the request being served must keep naming its own backend. Raises as
        `send` does."""
        response = await self.send(Exchange("POST", "", "", ""), "POST", subpath, query,
                                   headers, body)  # fmt: skip
        try:
            return response.status, await response.read()
        finally:
            response.close()

    def _wait_before_retry(
        self, member: Member, tried: list[Member], response: Response | None
    ) -> float | None:
        """Seconds to wait before the next attempt (0: another member, at once), or None
        when the attempt's response (or error) should go back to the client as it is."""
        now = time.monotonic()
        if self.balancer.any_available(now, [*tried, member]):
            return 0.0
        if not self._same_again or not member.available(now):
            return None
        retry_after = _retry_after(response) if response is not None else None
        if retry_after is None:
            return self._interval
        return retry_after if retry_after <= self._max_wait else None

    def _retrying(
        self,
        exchange: Exchange,
        member: Member,
        attempt: int,
        outcome: int | str,
        tried: list[Member],
    ) -> None:
        self._health.retries[member.upstream.id] += 1
        if member not in tried:
            tried.append(member)
        key = "http.response.status_code" if isinstance(outcome, int) else "error.type"
        exchange.event(
            "tollway.backend.retry",
            (("tollway.backend.id", member.upstream.id), ("tollway.retry.attempt", attempt + 1),
             (key, outcome)),
        )  # fmt: skip


def _retry_after(response: Response) -> float | None:
    """The wait a backend's error response asks for: `retry-after-ms` (OpenAI, Azure), else
    `Retry-After` in seconds or as an HTTP date."""
    millis = response.header(b"retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis), 0.0) / 1000.0
        except ValueError:
            pass
    value = response.header(b"retry-after")
    return retry_after_delay(value.decode("latin-1")) if value is not None else None


class BackendHealth:
    """Every backend's breaker and retry count, kept across config reloads (a breaker while
    its rule stays the same), read by the metrics."""

    def __init__(self, shared: SharedBreakers | None = None) -> None:
        self.breakers: dict[str, Breaker] = {}
        self.retries: collections.Counter[str] = collections.Counter()
        self.shared = shared

    def record(
        self, breaker: Breaker, probe: bool, failed: bool | None, retry_after: float | None = None
    ) -> None:
        """Record an outcome: failed, succeeded, or None (an error the rule does not count)."""
        if failed is None:
            breaker.abandon(probe)
            return
        was_open = breaker.until
        tripped = breaker.record(time.monotonic(), failed, probe, retry_after)
        if tripped:
            log.warning(
                "circuit breaker for backend %r tripped: no requests for %.1f s",
                breaker.backend_id, tripped,
            )  # fmt: skip
            if self.shared is not None:
                self.shared.tripped(breaker, tripped)
        elif was_open and not breaker.until:
            log.info("circuit breaker for backend %r closed: a probe succeeded", breaker.backend_id)
        elif failed and self.shared is not None:
            self.shared.failed(breaker)

    def update(self, config: Config) -> dict[str, Breaker]:
        kept: dict[str, Breaker] = {}
        for backend in config.backends:
            rule: CircuitBreaker | None = backend.circuit_breaker
            if rule is None:
                continue
            old = self.breakers.get(backend.id)
            kept[backend.id] = (
                old if old is not None and old.rule == rule else Breaker(backend.id, rule)
            )
        self.breakers = kept
        if self.shared is not None:
            self.shared.breakers = kept
        return kept

    def gauges(self) -> list[Gauge]:
        breakers = sorted(self.breakers.items())
        out = [
            Gauge(genai.BREAKER_OPEN, "", "1 while the backend's circuit breaker is tripped.",
                  per_backend((id, int(b.until > 0)) for id, b in breakers)),
            Gauge(genai.BREAKER_TRIPS, "", "Times the backend's circuit breaker tripped.",
                  per_backend((id, b.trips) for id, b in breakers), monotonic=True),
            Gauge(genai.BACKEND_RETRIES, "", "Attempts after a request's first.",
                  per_backend(sorted(dict(self.retries).items())), monotonic=True),
        ]  # fmt: skip
        return [g for g in out if g.points]


def per_backend(values: Iterable[tuple[str, int]]) -> tuple[_Point, ...]:
    """Gauge points labelled with the backend id."""
    return tuple(((("tollway.backend.id", id),), n) for id, n in values)


class Backends:
    """All configured backends and their routes, opened and closed together by the app."""

    def __init__(self, config: Config, health: BackendHealth | None = None):
        health = health or BackendHealth()
        by_id = health.update(config)
        self._singles = {b.id: Upstream(b) for b in config.backends if b.type == "single"}
        self._routes: dict[str, Route] = {}
        for backend in config.backends:
            if backend.type == "single":
                members = [Member(self._singles[backend.id], by_id.get(backend.id), 1, 1)]
            else:
                members = [
                    Member(self._singles[s.id], by_id.get(s.id), s.priority, s.weight)
                    for s in backend.services
                ]
            self._routes[backend.id] = Route(backend, members, health)

    async def open(self) -> None:
        for upstream in self._singles.values():
            await upstream.open()

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self._singles.values()))

    def connections(self) -> list[tuple[str, int]]:
        """Open connections per backend, for the metrics."""
        return [(id, u.connections) for id, u in sorted(self._singles.items())]

    def route(self, backend_id: str) -> Route:
        return self._routes[backend_id]
