"""Resilience state machines at the waypoint, pure: circuit breakers and outlier ejection,
configured by a `veil.core.traffic.TrafficPolicy`. Time is passed in (`now`), so every state
machine is tested without sleeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from veil.core.ratelimit import TokenBucket
from veil.core.traffic import PoolLimits, TrafficPolicy


@dataclass
class CircuitBreaker:
    """Envoy-style thresholds per backend: over any of them a request fails fast (503 UO)."""

    limits: PoolLimits
    connections: int = 0  # upstream connections open (in use or idle)
    pending: int = 0  # requests waiting for an upstream connection
    active: int = 0  # requests in flight

    def admit(self) -> bool:
        if self.active >= self.limits.max_requests:
            return False
        self.active += 1
        return True

    def done(self) -> None:
        self.active -= 1

    def may_connect(self) -> bool:
        return (
            self.connections < self.limits.max_connections
            and self.pending < self.limits.max_pending
        )


@dataclass
class OutlierDetector:
    """Eject an endpoint after N consecutive 5xx (or unreachable) for `ejection_time`."""

    consecutive: int = 5
    ejection_time: float = 30.0
    failures: dict[str, int] = field(default_factory=dict)
    ejected_until: dict[str, float] = field(default_factory=dict)

    def record(self, endpoint: str, status: int | None, now: float) -> None:
        if status is None or status >= 500:
            n = self.failures.get(endpoint, 0) + 1
            self.failures[endpoint] = n
            if n >= self.consecutive:
                self.ejected_until[endpoint] = now + self.ejection_time
                self.failures[endpoint] = 0
        else:
            self.failures.pop(endpoint, None)

    def ejected(self, endpoint: str, now: float) -> bool:
        until = self.ejected_until.get(endpoint)
        if until is None:
            return False
        if now >= until:
            del self.ejected_until[endpoint]
            return False
        return True


@dataclass
class Limits:
    """The waypoint's per-policy state: a token bucket per rate limit, an outlier detector
    per outlier setting (each replaced when its policy's numbers change)."""

    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    detectors: dict[str, OutlierDetector] = field(default_factory=dict)

    def admit(self, policy: TrafficPolicy, now: float) -> bool:
        """Whether a request fits the policy's rate limit (always, without one)."""
        if policy.rate is None:
            return True
        bucket = self.buckets.get(policy.key)
        if bucket is None or (bucket.rate, bucket.burst) != policy.rate:
            bucket = self.buckets[policy.key] = TokenBucket(*policy.rate)
        return bucket.take(now)

    def outliers(self, policy: TrafficPolicy) -> OutlierDetector | None:
        if policy.outlier is None:
            return None
        d = self.detectors.get(policy.key)
        if d is None or (d.consecutive, d.ejection_time) != policy.outlier:
            d = self.detectors[policy.key] = OutlierDetector(*policy.outlier)
        return d

    def record(
        self, policy: TrafficPolicy | None, endpoint: str, status: int | None, now: float
    ) -> None:
        if policy is not None and (d := self.outliers(policy)) is not None:
            d.record(endpoint, status, now)
