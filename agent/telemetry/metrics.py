"""Istio's standard TCP metrics and a JSON access log line per proxied connection.

Names and labels are Istio's (`istio_tcp_connections_opened_total` and friends), so the stock
Istio Grafana dashboards and Kiali queries work unchanged. `reporter` is `source` on the
client's node and `destination` on the server's; `connection_security_policy` is `mutual_tls`
for HBONE and `none` for plaintext and passthrough.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from agent.state.model import Service, Workload
from agent.telemetry.accesslog import AccessLog

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


def workload_name(w: Workload | None) -> str:
    """Istio's `workload`: the owning Deployment, else the pod itself; `unknown` outside."""
    if w is None:
        return "unknown"
    return w.owner or w.name


@dataclass
class Connection:
    """What one proxied connection was: filled in as it goes, reported when it ends."""

    reporter: str  # "source" | "destination"
    path: str  # "hbone" | "passthrough" | "plaintext"
    src: str
    dst: str
    source: Workload | None = None
    source_principal: str = "unknown"
    destination: Workload | None = None
    destination_principal: str = "unknown"
    service: Service | None = None
    trust_domain: str = "cluster.local"
    sent: int = 0  # bytes from the client towards the server
    received: int = 0  # bytes back to the client
    error: str = ""
    response_flags: str = "-"
    policy: str = ""  # the AuthorizationPolicy that decided, if one did
    started: float = field(default_factory=time.monotonic)

    def label_values(self) -> tuple[str, ...]:
        """The values of `LABELS`, in that order."""
        svc, src, dst = self.service, self.source, self.destination
        return (
            self.reporter,
            workload_name(src),
            src.namespace if src else "unknown",
            self.source_principal,
            f"{svc.name}.{svc.namespace}.svc.cluster.local" if svc else self.dst.rsplit(":", 1)[0],
            workload_name(dst),
            dst.namespace if dst else "unknown",
            self.destination_principal,
            "tcp",
            self.response_flags,
            "mutual_tls" if self.path == "hbone" else "none",
        )

    def labels(self) -> dict[str, str]:
        return dict(zip(LABELS, self.label_values(), strict=True))


class LabelChildren:
    """Each metric's child for a set of label values, kept: finding a child costs more than
    the update itself (prometheus-client checks and builds the label key on every call)."""

    def __init__(self, *metrics: Any) -> None:
        self.metrics = metrics
        self._cache: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def get(self, values: tuple[str, ...]) -> tuple[Any, ...]:
        children = self._cache.get(values)
        if children is None:
            children = self._cache[values] = tuple(m.labels(*values) for m in self.metrics)
        return children


class TcpMetrics:
    def __init__(self, registry: CollectorRegistry, access: AccessLog | None = None) -> None:
        self.access = access or AccessLog()
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", LABELS, registry=registry
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", LABELS, registry=registry
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent by the client side", LABELS, registry=registry
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes sent back to the client", LABELS, registry=registry
        )
        self._children = LabelChildren(self.opened, self.closed, self.sent, self.received)

    def record(self, c: Connection) -> None:
        """Count a connection that ended (or never started) and write its access log line."""
        values = c.label_values()
        opened, closed, sent, received = self._children.get(values)
        opened.inc()
        closed.inc()
        if c.sent:
            sent.inc(c.sent)
        if c.received:
            received.inc(c.received)
        if not self.access.enabled():
            return
        self.access.write(
            {
                "reporter": c.reporter,
                "path": c.path,
                "src": c.src,
                "dst": c.dst,
                "src_workload": values[1],
                "src_namespace": values[2],
                "src_identity": c.source_principal,
                "dst_service": values[4],
                "dst_workload": values[5],
                "dst_namespace": values[6],
                "dst_identity": c.destination_principal,
                "bytes_sent": c.sent,
                "bytes_received": c.received,
                "duration_ms": round((time.monotonic() - c.started) * 1000, 3),
                "decision": "deny" if c.response_flags == "RBAC" else "allow",
                "policy": c.policy or None,
                "response_flags": c.response_flags,
                "error": c.error or None,
            }
        )
