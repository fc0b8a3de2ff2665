"""The circuit breaker's state machine and the pool's member choice, driven with a fake clock."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from proxy.balancer import Balancer, Member
from proxy.breaker import Breaker
from proxy.config import CircuitBreaker, ConfigError, loads
from proxy.upstream import Upstream


def rule(**condition: object) -> CircuitBreaker:
    spec = {
        "failure-condition": {"interval": "10s", "status-code-ranges": [{"min": 500, "max": 599}],
                              **condition},
        "trip-duration": "30s",
    }  # fmt: skip
    return msgspec.convert(spec, CircuitBreaker, dec_hook=_dec)


def _dec(type_: type, value: object) -> object:
    return type_(value)


def with_retry_after(breaker_rule: CircuitBreaker) -> CircuitBreaker:
    return msgspec.structs.replace(breaker_rule, accept_retry_after=True)


# -- count ----------------------------------------------------------------------------------


def test_count_trips_on_the_nth_failure_within_the_interval() -> None:
    b = Breaker("a", rule(count=3))
    assert b.record(0.0, True, False) == 0
    assert b.record(1.0, True, False) == 0
    assert b.available(1.0)
    assert b.record(2.0, True, False) == 30.0
    assert b.state(2.0) == "open" and not b.available(2.0)
    assert b.reopens_in(2.0) == pytest.approx(30.0)
    assert b.trips == 1


def test_count_forgets_failures_older_than_the_interval() -> None:
    b = Breaker("a", rule(count=3))
    b.record(0.0, True, False)
    b.record(5.0, True, False)
    assert b.record(10.5, True, False) == 0  # the first failure left the 10 s window
    assert b.state(10.5) == "closed"
    assert b.record(11.0, True, False) == 30.0  # 5.0, 10.5, 11.0


def test_successes_do_not_reset_a_count_window() -> None:
    b = Breaker("a", rule(count=2))
    b.record(0.0, True, False)
    for t in range(1, 5):
        b.record(float(t), False, False)
    assert b.record(5.0, True, False) == 30.0


def test_statuses_and_reasons_classified_by_the_rule() -> None:
    b = Breaker("a", rule(count=1, **{"error-reasons": ["timeout"]}))
    assert b.failure_status(500) and b.failure_status(599)
    assert not b.failure_status(429) and not b.failure_status(200)
    assert b.failure_reason("timeout") and not b.failure_reason("connection")


# -- percentage -----------------------------------------------------------------------------


def test_percentage_waits_for_min_requests_then_trips() -> None:
    b = Breaker("a", rule(percentage=50, **{"min-requests": 4}))
    assert b.record(0.0, True, False) == 0  # 1 of 1 failed, but only one request seen
    assert b.record(0.1, True, False) == 0
    assert b.record(0.2, False, False) == 0
    assert b.record(0.3, True, False) == 30.0  # 3 of 4 failed


def test_percentage_below_the_threshold_stays_closed() -> None:
    b = Breaker("a", rule(percentage=50, **{"min-requests": 4}))
    for i in range(30):
        b.record(i * 0.1, i % 3 == 2, False)  # every third fails
    assert b.state(3.0) == "closed"


def test_percentage_counts_only_the_interval() -> None:
    b = Breaker("a", rule(percentage=50, **{"min-requests": 4}))
    for i in range(3):
        b.record(float(i), True, False)  # old failures
    for i in range(20):
        b.record(20.0 + i * 0.1, False, False)
    assert b.record(22.5, True, False) == 0  # 1 of 21 in the window
    assert b.state(22.5) == "closed"


# -- tripped, half-open ---------------------------------------------------------------------


def test_half_open_lets_exactly_one_probe_through() -> None:
    b = Breaker("a", rule(count=1))
    b.record(0.0, True, False)
    assert not b.available(29.9)
    assert b.state(30.0) == "half-open" and b.available(30.0)
    assert b.take(30.0) is True  # the probe
    assert not b.available(30.0)  # a second request waits for the probe's outcome
    assert b.reopens_in(30.0) == 1.0
    b.record(30.5, False, True)
    assert b.state(30.5) == "closed" and b.available(30.5)
    assert b.take(30.5) is False


def test_a_failed_probe_trips_again_for_the_whole_duration() -> None:
    b = Breaker("a", rule(count=5))
    for t in range(5):
        b.record(float(t), True, False)
    assert b.take(34.0) is True
    assert b.record(34.0, True, True) == 30.0
    assert not b.available(63.9) and b.available(64.0)
    assert b.trips == 2


def test_an_abandoned_probe_frees_the_slot() -> None:
    b = Breaker("a", rule(count=1))
    b.record(0.0, True, False)
    assert b.take(30.0)
    b.abandon(True)
    assert b.available(30.0) and b.take(30.0)


def test_outcomes_of_requests_sent_before_the_trip_change_nothing() -> None:
    b = Breaker("a", rule(count=1))
    b.record(0.0, True, False)
    assert b.record(1.0, False, False) == 0  # a slow success from before the trip
    assert b.state(1.0) == "open"


def test_accept_retry_after_sets_the_trip_duration() -> None:
    b = Breaker("a", with_retry_after(rule(count=1)))
    assert b.record(0.0, True, False, retry_after=7.0) == 7.0
    assert b.available(7.0)
    plain = Breaker("a", rule(count=1))
    assert plain.record(0.0, True, False, retry_after=7.0) == 30.0  # not accepted


def test_trip_for_only_extends() -> None:
    b = Breaker("a", rule(count=1))
    b.trip_for(0.0, 10.0)
    b.trip_for(0.0, 5.0)
    assert b.reopens_in(0.0) == 10.0


def test_rule_needs_count_or_percentage_not_both() -> None:
    base = "backends: [{id: a, url: 'http://x/v1', circuit-breaker: {failure-condition: %s, trip-duration: 1s}}]\napis: [{id: c, path: /o, backend: a}]"
    with pytest.raises(ConfigError, match="give either count or percentage"):
        loads(base % "{count: 1, percentage: 5, interval: 1s, error-reasons: [timeout]}")
    with pytest.raises(ConfigError, match="give either count or percentage"):
        loads(base % "{interval: 1s, error-reasons: [timeout]}")
    loads(base % "{percentage: 5, interval: 1s, error-reasons: [timeout]}")


def test_a_pool_holds_at_most_30_members() -> None:
    singles = "".join(f"  - {{id: b{i}, url: 'http://x/v1'}}\n" for i in range(31))
    services = ", ".join(f"{{id: b{i}}}" for i in range(31))
    text = f"backends:\n{singles}  - {{id: p, type: pool, services: [{services}]}}\napis: [{{id: c, path: /o, backend: p}}]"
    with pytest.raises(ConfigError, match="services"):
        loads(text)


# -- balancer -------------------------------------------------------------------------------


def members(*specs: tuple[str, int, int, Breaker | None]) -> list[Member]:
    out = []
    for name, priority, weight, breaker in specs:
        backend = loads(
            f"backends: [{{id: {name}, url: 'http://x/v1'}}]\napis: [{{id: c, path: /o, backend: {name}}}]"
        ).backends[0]
        out.append(Member(Upstream(backend), breaker, priority, weight))
    return out


def names(balancer: Balancer, n: int, now: float = 0.0) -> list[str]:
    picked = [balancer.choose(now) for _ in range(n)]
    return [m.upstream.id if m else "-" for m in picked]


def test_smooth_weighted_round_robin_interleaves() -> None:
    balancer = Balancer(members(("a", 1, 3, None), ("b", 1, 1, None)))
    assert names(balancer, 8) == ["a", "a", "b", "a", "a", "a", "b", "a"]
    assert Counter(names(balancer, 400)) == {"a": 300, "b": 100}


def test_lower_priority_only_when_every_higher_is_tripped() -> None:
    ba, bb = Breaker("a", rule(count=1)), Breaker("b", rule(count=1))
    balancer = Balancer(members(("a", 1, 1, ba), ("b", 1, 1, bb), ("c", 2, 1, None)))
    assert set(names(balancer, 10)) == {"a", "b"}
    ba.record(0.0, True, False)
    assert set(names(balancer, 10, now=1.0)) == {"b"}
    bb.record(0.0, True, False)
    assert set(names(balancer, 10, now=1.0)) == {"c"}
    assert set(names(balancer, 1, now=31.0)) <= {"a", "b"}  # half-open: a probe goes first


def test_excluded_members_are_skipped_and_none_when_all_are() -> None:
    pool = members(("a", 1, 1, None), ("b", 2, 1, None))
    balancer = Balancer(pool)
    assert balancer.choose(0.0, [pool[0]]) is pool[1]
    assert balancer.choose(0.0, pool) is None
    assert balancer.any_available(0.0, [pool[0]]) and not balancer.any_available(0.0, pool)


def test_soonest_is_the_earliest_reopening() -> None:
    ba, bb = Breaker("a", rule(count=1)), Breaker("b", rule(count=1))
    balancer = Balancer(members(("a", 1, 1, ba), ("b", 1, 1, bb)))
    ba.trip_for(0.0, 12.0)
    bb.trip_for(0.0, 4.0)
    assert balancer.choose(1.0) is None
    assert balancer.soonest(1.0) == pytest.approx(3.0)
