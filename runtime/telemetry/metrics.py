"""Istio's standard TCP metrics and a JSON access log line per proxied connection.

Names and labels are Istio's (`istio_tcp_connections_opened_total` and friends), so the stock
Istio Grafana dashboards and Kiali queries work unchanged. `reporter` is `source` on the
client's node and `destination` on the server's; `connection_security_policy` is `mutual_tls`
for HBONE and `none` for plaintext and passthrough.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from veil.core.state import Service, Workload
from veil.runtime.telemetry.accesslog import AccessLog

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


# name, help, index into a label set's counts (a connection is counted opened and closed
# together, when it ends, so both come from one count)
_TCP_FAMILIES = (
    ("istio_tcp_connections_opened", "TCP connections opened", 0),
    ("istio_tcp_connections_closed", "TCP connections closed", 0),
    ("istio_tcp_sent_bytes", "Bytes sent by the client side", 1),
    ("istio_tcp_received_bytes", "Bytes sent back to the client", 2),
)
_q = encode_basestring_ascii  # a JSON string, as json.dumps writes it
# Access log keys taken from the label values (index into LABELS), in the line's order.
_LOG_LABELS = (
    ("src_workload", 1),
    ("src_namespace", 2),
    ("src_identity", 3),
    ("dst_service", 4),
    ("dst_workload", 5),
    ("dst_namespace", 6),
    ("dst_identity", 7),
)


class TcpMetrics(Collector):
    """Istio's four TCP counters, kept as plain integers per label set and exported at scrape
    time (prometheus-client's Counter takes a lock and checks its arguments on every `inc`:
    four per connection and side), and the access log line per connection."""

    def __init__(self, registry: CollectorRegistry, access: AccessLog | None = None) -> None:
        self.access = access or AccessLog()
        # label values -> [connections, sent bytes, received bytes]
        self._counts: dict[tuple[str, ...], list[int]] = {}
        # label values -> the access log fields they decide, encoded once
        self._fields: dict[tuple[str, ...], str] = {}
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        rows = list(self._counts.items())
        for name, doc, i in _TCP_FAMILIES:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            for values, counts in rows:
                family.add_metric(values, counts[i])
            yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, doc, _ in _TCP_FAMILIES:
            yield CounterMetricFamily(name, doc, labels=LABELS)

    def record(self, c: Connection) -> None:
        """Count a connection that ended (or never started) and write its access log line."""
        values = c.label_values()
        counts = self._counts.get(values)
        if counts is None:
            counts = self._counts[values] = [0, 0, 0]
        counts[0] += 1
        counts[1] += c.sent
        counts[2] += c.received
        if not self.access.enabled():
            return
        fields = self._fields.get(values)
        if fields is None:
            if len(self._fields) >= 4096:
                self._fields.clear()
            fields = self._fields[values] = ", ".join(
                f'"{key}": {_q(values[i])}' for key, i in _LOG_LABELS
            )
        duration = round((time.monotonic() - c.started) * 1000, 3)
        # The same line json.dumps would write for the entry, in this key order.
        self.access.write_json(
            f'{{"reporter": {_q(c.reporter)}, "path": {_q(c.path)}, "src": {_q(c.src)}, '
            f'"dst": {_q(c.dst)}, {fields}, "bytes_sent": {c.sent:d}, '
            f'"bytes_received": {c.received:d}, "duration_ms": {duration!r}, '
            f'"decision": "{"deny" if c.response_flags == "RBAC" else "allow"}", '
            f'"policy": {_q(c.policy) if c.policy else "null"}, '
            f'"response_flags": {_q(c.response_flags)}, '
            f'"error": {_q(c.error) if c.error else "null"}}}'
        )
