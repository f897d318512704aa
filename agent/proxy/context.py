"""What a pod's proxy roles share: the agent-wide context, and one pod's runtime (its
netns, identity and tunnel pool), handed to each listener role."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from veil.agent.capture.netns import NetNs
from veil.agent.proxy.copy import Transferred
from veil.core.admission import Admission
from veil.core.authz import Decision
from veil.core.spiffe import SpiffeId
from veil.core.state import Workload
from veil.runtime.hbone.pool import HbonePool
from veil.runtime.identity.copies import Certificates
from veil.runtime.store import StateStore
from veil.runtime.telemetry.metrics import Connection, TcpMetrics

log = logging.getLogger("veil.proxy")
CERT_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0


def denied_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "veil_authz_denied",
        "Connections denied by AuthorizationPolicy",
        ["policy"],
        registry=registry,
    )


@dataclass
class ProxyContext:
    """What every pod proxy of an agent shares."""

    node: str
    trust_domain: str
    store: StateStore
    certs: Certificates
    cert_timeout: float = CERT_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    metrics: TcpMetrics | None = None
    denied: Counter | None = None
    admission: Admission = field(default_factory=Admission)

    def count_denial(self, w: Workload, source: str, port: int, d: Decision) -> None:
        """Log and count a connection an AuthorizationPolicy denied."""
        log.info(
            "denied %s -> %s:%d: policy %s: %s", source, w.key, port, d.policy or "-", d.reason
        )
        if self.denied is not None:
            self.denied.labels(policy=d.policy or "none").inc()

    def report(self, c: Connection, moved: Transferred | None = None) -> None:
        """Count a connection that ended (or never started) and write its access log line."""
        if moved is not None:
            c.sent, c.received = moved.up, moved.down
        if self.metrics is not None:
            self.metrics.record(c)


@dataclass
class PodRuntime:
    """One enrolled pod as its listeners see it: `ns` and `pool` exist while it runs."""

    ctx: ProxyContext
    workload: Workload
    ip: str
    identity: SpiffeId
    ns: NetNs | None = None
    pool: HbonePool | None = None
