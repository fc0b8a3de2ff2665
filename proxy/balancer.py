"""Which member of a backend pool takes the next request (SPEC §3 `type: pool`).

Members are grouped by `priority` (lower first). The most preferred group with a member
available — its breaker not tripped, and not already tried by this request — is used;
within it, smooth weighted round robin (nginx's: each pick adds every candidate's weight to
its score, takes the highest and subtracts the total from it) spreads requests by `weight`
and interleaves them (weights 3:1 give a a b a, not a a a b). A lower priority is used only
when every higher one is tripped or excluded.
"""

from __future__ import annotations

from collections.abc import Collection

from proxy.breaker import Breaker
from proxy.upstream import Upstream


class Member:
    """A pool's view of one backend."""

    __slots__ = ("breaker", "priority", "score", "upstream", "weight")

    def __init__(self, upstream: Upstream, breaker: Breaker | None, priority: int, weight: int):
        self.upstream = upstream
        self.breaker = breaker
        self.priority = priority
        self.weight = weight
        self.score = 0

    def available(self, now: float) -> bool:
        breaker = self.breaker
        return breaker is None or breaker.available(now)


class Balancer:
    """Picks members of one pool (or the one member of a single backend)."""

    def __init__(self, members: list[Member]):
        self.members = members
        priorities = sorted({m.priority for m in members})
        self._groups = [[m for m in members if m.priority == p] for p in priorities]
        self._only = members[0] if len(members) == 1 else None

    def choose(self, now: float, exclude: Collection[Member] = ()) -> Member | None:
        """The member for the next attempt, or None when none is available."""
        only = self._only
        if only is not None:
            return only if only not in exclude and only.available(now) else None
        for group in self._groups:
            best: Member | None = None
            total = 0
            for member in group:
                if member in exclude or not member.available(now):
                    continue
                member.score += member.weight
                total += member.weight
                if best is None or member.score > best.score:
                    best = member
            if best is not None:
                best.score -= total
                return best
        return None

    def any_available(self, now: float, exclude: Collection[Member] = ()) -> bool:
        return any(m not in exclude and m.available(now) for m in self.members)

    def soonest(self, now: float) -> float:
        """Seconds until some member is available again (for Retry-After)."""
        waits = [m.breaker.reopens_in(now) for m in self.members if m.breaker is not None]
        return min(waits, default=1.0)
