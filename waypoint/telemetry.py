"""Istio's standard request metrics for the waypoint, and one JSON access-log line per request."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from veil.runtime.telemetry.accesslog import AccessLog
from veil.runtime.telemetry.metrics import LABELS as TCP_LABELS
from veil.runtime.telemetry.metrics import LabelChildren

LABELS = (*TCP_LABELS, "response_code")  # Istio's request labels: the TCP ones + the code
MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
BYTE_BUCKETS = (0, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000)


@dataclass
class RequestRecord:
    method: str
    path: str
    authority: str
    source_workload: str = "unknown"
    source_namespace: str = "unknown"
    source_principal: str = "unknown"
    destination_service: str = "unknown"
    destination_workload: str = "unknown"
    destination_namespace: str = "unknown"
    destination_principal: str = "unknown"
    route: str = ""
    upstream: str = ""
    response_code: int = 0
    response_flags: str = "-"
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: float = 0.0
    traceparent: str = ""
    retries: int = 0
    error: str | None = None
    audit: tuple[str, ...] = ()  # AUDIT policies that matched (Istio's AUDIT action)


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.access = AccessLog()
        self.requests = Counter(
            "istio_requests", "Requests handled by the waypoint", LABELS, registry=registry
        )
        self.audited = Counter(
            "veil_authz_audited",
            "Requests an AUDIT AuthorizationPolicy matched",
            ["policy"],
            registry=registry,
        )
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration",
            LABELS,
            buckets=MS_BUCKETS,
            registry=registry,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request body size",
            LABELS,
            buckets=BYTE_BUCKETS,
            registry=registry,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response body size",
            LABELS,
            buckets=BYTE_BUCKETS,
            registry=registry,
        )

        self._children = LabelChildren(
            self.requests, self.duration, self.request_bytes, self.response_bytes
        )
        self.mirrored = Counter(
            "veil_waypoint_mirrored_requests",
            "Copies sent by RequestMirror filters, by mirror backend and its answer",
            ["backend", "response_code"],
            registry=registry,
        )
        self.tcp_denied = Counter(
            "veil_waypoint_tcp_denied",
            "Non-HTTP streams refused by the AuthorizationPolicies in scope (judged as TCP)",
            registry=registry,
        )

    def record(self, r: RequestRecord) -> None:
        labels = (
            "waypoint",
            r.source_workload,
            r.source_namespace,
            r.source_principal,
            r.destination_service,
            r.destination_workload,
            r.destination_namespace,
            r.destination_principal,
            "http",
            r.response_flags,
            "mutual_tls",
            str(r.response_code),
        )
        requests, duration, request_bytes, response_bytes = self._children.get(labels)
        requests.inc()
        duration.observe(r.duration_ms)
        request_bytes.observe(r.request_bytes)
        response_bytes.observe(r.response_bytes)
        for ref in r.audit:
            self.audited.labels(ref).inc()
        if self.access.enabled():
            self.access.write(vars(r))
