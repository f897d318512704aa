"""Traffic settings, typed: durations, retries, connection-pool limits, faults, and the
`TrafficPolicy` CRD that configures what Gateway API has no field for. Parsed once by the
state's writer; the waypoint's state machines that use them (circuit breakers, outlier
ejection) are in `veil.waypoint.resilience`. Randomness is passed in (`rng`).

    apiVersion: traffic.veil.dev/v1
    kind: TrafficPolicy
    metadata: {name: catalog, namespace: shop}
    spec:
      targetRefs: [{group: "", kind: Service, name: catalog}]   # or an HTTPRoute
      retry: {attempts: 2, backoff: 50ms, codes: [502, 503]}   # when the HTTPRoute rule has none
      faults:
        delay: {percent: 10, fixedDelay: 2s}
        abort: {percent: 5, httpStatus: 503}
      rateLimit: {requestsPerSecond: 50, burst: 100}           # per waypoint pod; 429 beyond
      connectionPool: {maxConnections: 64, maxPendingRequests: 16, maxRequests: 128}
      outlierDetection: {consecutive5xxErrors: 5, baseEjectionTime: 30s}
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veil.core.objects import refuse_odd_shapes

GROUP = "traffic.veil.dev"
KIND = "TrafficPolicy"
_DURATION = re.compile(r"^(?:([0-9]{1,5})(h|ms|m|s)){1,4}$")
_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class PolicyError(ValueError):
    """A resilience setting that cannot be applied; names the object and field."""


def parse_duration(value: Any, where: str) -> float:
    """Gateway API durations: 1-4 parts of number + h|m|s|ms, e.g. `1m30s`, `250ms`."""
    text = str(value)
    if not _DURATION.match(text):
        raise PolicyError(f"{where}: {text!r} is not a duration like 500ms, 2s or 1m30s")
    return sum(int(n) * _UNIT[u] for n, u in _PART.findall(text))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 0  # retries after the first try
    backoff: float = 0.025
    codes: frozenset[int] = frozenset({502, 503, 504})

    def retries(self, attempt: int, status: int | None) -> bool:
        """Try again after try number `attempt` (1-based) that ended in `status` (None: the
        backend could not be reached or did not answer in time)?"""
        return attempt <= self.attempts and (status is None or status in self.codes)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with jitter, capped at 10x the base, and never shorter than
        the base: Gateway API's `backoff` is the minimum wait between tries."""
        cap = min(self.backoff * 2 ** (attempt - 1), self.backoff * 10)
        return (rng or random).uniform(max(self.backoff, cap / 2), cap)


def parse_retry(doc: Mapping[str, Any] | None, where: str) -> RetryPolicy | None:
    if not doc:
        return None
    attempts = int(doc.get("attempts", 1))
    if not 0 <= attempts <= 10:
        raise PolicyError(f"{where}.attempts: {attempts} is outside 0-10")
    codes = frozenset(int(c) for c in doc.get("codes") or (502, 503, 504))
    if any(not 400 <= c <= 599 for c in codes):  # Gateway API's HTTPRouteRetryStatusCode
        raise PolicyError(f"{where}.codes: only codes 400-599 can be retried")
    backoff = parse_duration(doc["backoff"], f"{where}.backoff") if "backoff" in doc else 0.025
    return RetryPolicy(attempts, backoff, codes)


@dataclass(frozen=True)
class PoolLimits:
    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024


@dataclass(frozen=True)
class Fault:
    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    abort_status: int = 503

    def decide(self, rng: random.Random) -> tuple[float, int | None]:
        """(seconds to wait, status to answer instead of forwarding or None)."""
        wait = self.delay if rng.uniform(0, 100) < self.delay_percent else 0.0
        abort = self.abort_status if rng.uniform(0, 100) < self.abort_percent else None
        return wait, abort


@dataclass(frozen=True)
class TrafficPolicy:
    namespace: str
    name: str
    services: tuple[str, ...]  # targetRefs: Services in the policy's namespace
    retry: RetryPolicy | None = None
    fault: Fault | None = None
    rate: tuple[float, float] | None = None  # (requests per second, burst)
    pool: PoolLimits | None = None
    outlier: tuple[int, float] | None = None  # (consecutive 5xx, ejection seconds)
    routes: tuple[str, ...] = ()  # targetRefs: HTTPRoutes (rate limits and faults per route)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _percent(v: Any, where: str) -> float:
    p = float(v)
    if not 0 <= p <= 100:
        raise PolicyError(f"{where}: {p} is outside 0-100")
    return p


@refuse_odd_shapes(PolicyError, lambda ref, e: PolicyError(f"{KIND} {ref}: cannot read: {e!r}"))
def parse_traffic_policy(obj: Mapping[str, Any]) -> TrafficPolicy:
    md = obj.get("metadata") or {}
    ns, name = md.get("namespace", "default"), md.get("name", "?")
    where = f"{KIND} {ns}/{name}: spec"
    spec = obj.get("spec") or {}
    try:
        services, routes = [], []
        for i, t in enumerate(spec.get("targetRefs") or []):
            if t.get("kind") == "Service":
                services.append(str(t["name"]))
            elif t.get("kind") == "HTTPRoute":
                routes.append(str(t["name"]))
            else:
                raise PolicyError(f"{where}.targetRefs[{i}].kind: Service or HTTPRoute")
        if not services and not routes:
            raise PolicyError(f"{where}.targetRefs: at least one Service or HTTPRoute")
        fault = None
        if f := spec.get("faults"):
            d, a = f.get("delay") or {}, f.get("abort") or {}
            status = int(a.get("httpStatus", 503))
            if not 200 <= status <= 599:
                raise PolicyError(f"{where}.faults.abort.httpStatus: {status} is not a status")
            fault = Fault(
                _percent(d.get("percent", 100 if d else 0), f"{where}.faults.delay.percent"),
                parse_duration(d["fixedDelay"], f"{where}.faults.delay.fixedDelay") if d else 0.0,
                _percent(a.get("percent", 100 if a else 0), f"{where}.faults.abort.percent"),
                status,
            )
        rate = None
        if r := spec.get("rateLimit"):
            rps = float(r["requestsPerSecond"])
            if rps <= 0:
                raise PolicyError(f"{where}.rateLimit.requestsPerSecond: must be positive")
            rate = (rps, float(r.get("burst", rps)))
        pool = None
        if p := spec.get("connectionPool"):
            pool = PoolLimits(
                int(p.get("maxConnections", 1024)),
                int(p.get("maxPendingRequests", 1024)),
                int(p.get("maxRequests", 1024)),
            )
        outlier = None
        if o := spec.get("outlierDetection"):
            outlier = (
                int(o.get("consecutive5xxErrors", 5)),
                parse_duration(o.get("baseEjectionTime", "30s"), f"{where}.outlierDetection"),
            )
        return TrafficPolicy(
            ns,
            name,
            tuple(services),
            parse_retry(spec.get("retry"), f"{where}.retry"),
            fault,
            rate,
            pool,
            outlier,
            tuple(routes),
        )
    except PolicyError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PolicyError(f"{where}: cannot read: {e!r}") from None
