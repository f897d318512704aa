"""Istio's standard TCP metrics and a JSON access log line per proxied connection.

Names and labels are Istio's (`istio_tcp_connections_opened_total` and friends), so the stock
Istio Grafana dashboards and Kiali queries work unchanged. `reporter` is `source` on the
client's node and `destination` on the server's; `connection_security_policy` is `mutual_tls`
for HBONE and `none` for plaintext and passthrough.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from agent.state.model import Service, Workload

access = logging.getLogger("veil.access")

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

    def labels(self) -> dict[str, str]:
        svc = self.service
        return {
            "reporter": self.reporter,
            "source_workload": workload_name(self.source),
            "source_workload_namespace": self.source.namespace if self.source else "unknown",
            "source_principal": self.source_principal,
            "destination_service": (
                f"{svc.name}.{svc.namespace}.svc.cluster.local"
                if svc
                else self.dst.rsplit(":", 1)[0]
            ),
            "destination_workload": workload_name(self.destination),
            "destination_workload_namespace": (
                self.destination.namespace if self.destination else "unknown"
            ),
            "destination_principal": self.destination_principal,
            "request_protocol": "tcp",
            "response_flags": self.response_flags,
            "connection_security_policy": "mutual_tls" if self.path == "hbone" else "none",
        }


class TcpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
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

    def open(self, c: Connection) -> None:
        self.opened.labels(**c.labels()).inc()

    def close(self, c: Connection) -> None:
        labels = c.labels()
        self.closed.labels(**labels).inc()
        if c.sent:
            self.sent.labels(**labels).inc(c.sent)
        if c.received:
            self.received.labels(**labels).inc(c.received)
        access.info(
            "%s",
            json.dumps(
                {
                    "reporter": c.reporter,
                    "path": c.path,
                    "src": c.src,
                    "dst": c.dst,
                    "src_workload": labels["source_workload"],
                    "src_namespace": labels["source_workload_namespace"],
                    "src_identity": c.source_principal,
                    "dst_service": labels["destination_service"],
                    "dst_workload": labels["destination_workload"],
                    "dst_namespace": labels["destination_workload_namespace"],
                    "dst_identity": c.destination_principal,
                    "bytes_sent": c.sent,
                    "bytes_received": c.received,
                    "duration_ms": round((time.monotonic() - c.started) * 1000, 3),
                    "decision": "deny" if c.response_flags == "RBAC" else "allow",
                    "policy": c.policy or None,
                    "response_flags": c.response_flags,
                    "error": c.error or None,
                }
            ),
        )
