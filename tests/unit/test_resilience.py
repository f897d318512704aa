"""The waypoint's resilience state machines, with time and randomness passed in."""

from __future__ import annotations

import random
from typing import Any

import pytest

from veil.core.ratelimit import TokenBucket
from veil.core.traffic import (
    Fault,
    PolicyError,
    PoolLimits,
    RetryPolicy,
    parse_duration,
    parse_traffic_policy,
)
from veil.waypoint.resilience import CircuitBreaker, OutlierDetector


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("2s", 2), ("1m30s", 90), ("1h", 3600), ("1s250ms", 1.25)]
)
def test_durations(text, seconds):
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "1.5s", "-1s", "1d", "s"])
def test_bad_durations(bad):
    with pytest.raises(PolicyError, match="is not a duration"):
        parse_duration(bad, "x")


def test_retries_on_unreachable_and_chosen_codes_only():
    r = RetryPolicy(attempts=2, backoff=0.1, codes=frozenset({503}))
    assert r.retries(1, None) and r.retries(1, 503) and r.retries(2, 503)
    assert not r.retries(3, 503)  # two retries after the first try, then give up
    assert not r.retries(1, 500) and not r.retries(1, 404)
    rng = random.Random(1)
    delays = [r.delay(n, rng) for n in (1, 2, 3, 8)]
    assert delays[0] == 0.1 and 0.1 <= delays[1] <= 0.2 and 0.2 <= delays[2] <= 0.4
    assert delays[3] <= 1.0  # capped at 10x the base


def test_no_retry_waits_less_than_the_backoff():
    """Issue 22: Gateway API's `backoff` is the minimum wait; the first one could be half."""
    r = RetryPolicy(attempts=5, backoff=0.1)
    rng = random.Random(7)
    assert min(r.delay(n, rng) for n in range(1, 6) for _ in range(200)) >= 0.1


def test_token_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=2, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.25) and b.take(0.5)  # one token every 0.5 s
    assert [b.take(10.0) for _ in range(4)] == [True, True, True, False]  # never above burst


def test_circuit_breaker_limits_requests_in_flight():
    cb = CircuitBreaker(PoolLimits(max_connections=1, max_pending=1, max_requests=2))
    assert cb.admit() and cb.admit() and not cb.admit()
    cb.done()
    assert cb.admit()
    assert cb.may_connect()
    cb.connections = 1
    assert not cb.may_connect()


def test_outlier_ejection_after_consecutive_5xx_for_a_period():
    o = OutlierDetector(consecutive=3, ejection_time=10)
    for status in (503, 500, 200, 503, 503):  # a success resets the count
        o.record("a", status, 0.0)
    assert not o.ejected("a", 0.0)
    o.record("a", None, 1.0)  # unreachable counts too
    assert o.ejected("a", 5.0) and not o.ejected("b", 5.0)
    assert not o.ejected("a", 11.0)  # back after the ejection time


def test_fault_injection_by_percentage():
    f = Fault(delay_percent=50, delay=1.0, abort_percent=10, abort_status=503)
    rng = random.Random(3)
    got = [f.decide(rng) for _ in range(2000)]
    delayed = sum(1 for d, _ in got if d) / 2000
    aborted = sum(1 for _, a in got if a) / 2000
    assert abs(delayed - 0.5) < 0.04 and abs(aborted - 0.1) < 0.03


def test_traffic_policy_parses_and_names_bad_fields():
    doc: dict[str, Any] = {
        "apiVersion": "traffic.veil.dev/v1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "catalog"}],
            "retry": {"attempts": 2, "backoff": "50ms", "codes": [503]},
            "faults": {"abort": {"percent": 50, "httpStatus": 503}},
            "rateLimit": {"requestsPerSecond": 5, "burst": 10},
            "connectionPool": {"maxRequests": 4},
            "outlierDetection": {"consecutive5xxErrors": 2, "baseEjectionTime": "5s"},
        },
    }
    p = parse_traffic_policy(doc)
    assert p.services == ("catalog",) and p.retry == RetryPolicy(2, 0.05, frozenset({503}))
    assert p.fault == Fault(0, 0, 50, 503) and p.rate == (5, 10)
    assert p.pool is not None and p.pool.max_requests == 4 and p.outlier == (2, 5.0)
    doc["spec"]["retry"]["codes"] = [429, 503]  # Gateway API's range is 400-599
    assert parse_traffic_policy(doc).retry == RetryPolicy(2, 0.05, frozenset({429, 503}))
    doc["spec"]["retry"]["codes"] = [302]
    with pytest.raises(PolicyError, match=r"TrafficPolicy shop/p: spec.retry.codes"):
        parse_traffic_policy(doc)


def test_a_traffic_policy_can_target_an_httproute():
    p = parse_traffic_policy(
        {
            "kind": "TrafficPolicy",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "HTTPRoute", "name": "catalog"}],
                "rateLimit": {"requestsPerSecond": 2},
            },
        }
    )
    assert p.routes == ("catalog",) and p.services == () and p.rate == (2.0, 2.0)
    with pytest.raises(PolicyError, match="Service or HTTPRoute"):
        parse_traffic_policy(
            {"kind": "TrafficPolicy", "spec": {"targetRefs": [{"kind": "Gateway", "name": "w"}]}}
        )
