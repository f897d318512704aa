"""What one peer, and all peers together, may hold of an HBONE server (agent or waypoint).

Without caps, any pod can exhaust a node: idle TLS handshakes (each a socket and TLS state),
a few tunnels with a thousand streams each (each stream an app connection: a descriptor), or
CONNECTs to an app that never accepts (each a pending connect). Every cap refuses the newest
thing asked for, leaves what is established alone, and is counted in
`veil_admission_refused_total{limit}` so an operator sees who hits which.

| limit | default | refused with |
|---|---|---|
| `handshakes_per_peer`: TLS handshakes in progress from one peer IP | 64 | closed |
| `handshakes`: TLS handshakes in progress on the node | 2048 | closed |
| `tunnels_per_peer`: tunnels from one peer IP to one pod or waypoint | 16 | closed |
| `tunnels`: inbound tunnels on the node | 8192 | closed |
| `streams`: inbound streams with an app connection on the node | half the open-files limit | 503 |
| `pending_connects`: app connections being opened on the node | 1024 | 503 |
| `penalized`: handshakes from a peer whose tunnel was ended for a flood (below) | 1-30 s | closed |

A client pools one tunnel per (identity, destination) and opens another only past 100 streams
(the most a tunnel takes), so 16 tunnels from one pod to one pod is 1600 concurrent
connections between them before anything is refused.

A peer whose tunnel the agent ended for a flood (ENHANCE_YOUR_CALM: PINGs, SETTINGS, empty
frames) may reconnect at once and flood again, each time for the price of a handshake the
agent pays too: measured, 4 such peers made ~145 handshakes a second and moved the p50 of
everyone else's traffic 10x. Its handshakes are refused (closed before TLS) for a while,
1 s after the first flood, doubling with each flood within the window, up to 30 s.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


def _default_streams() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 19
    return max(soft // 2, 256)


@dataclass
class Limits:
    handshakes_per_peer: int = 64
    handshakes: int = 2048
    tunnels_per_peer: int = 16
    tunnels: int = 8192
    streams: int = field(default_factory=_default_streams)
    pending_connects: int = 1024
    penalty: float = 1.0  # seconds a flooding peer's handshakes are refused, doubled per repeat
    max_penalty: float = 30.0


class Admission:
    """Counters against `Limits`; every `take_*` that returns True has a matching `drop_*`."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.handshakes = 0
        self.handshakes_by_peer: Counter[str] = Counter()
        self.tunnels = 0
        self.streams = 0
        self.pending_connects = 0
        self.tunnels_by_peer: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[str] = Counter()
        self.penalties: dict[str, tuple[float, float]] = {}  # peer IP: (until, last length)

    def _refuse(self, limit: str) -> bool:
        self.refused[limit] += 1
        return False

    def penalize(self, peer_ip: str, now: float | None = None) -> float:
        """A tunnel from `peer_ip` was ended for a flood: refuse its handshakes for a while
        (doubled if it flooded again within twice its last penalty); how long."""
        now = time.monotonic() if now is None else now
        until, length = self.penalties.get(peer_ip, (0.0, 0.0))
        repeat = now < until + length  # within the penalty, or as long again after it
        length = min(self.limits.max_penalty, 2 * length) if repeat else self.limits.penalty
        self.penalties[peer_ip] = (now + length, length)
        if len(self.penalties) > 4096:  # authenticated peers only, but bounded all the same
            self.penalties = {ip: p for ip, p in self.penalties.items() if p[0] + p[1] > now}
        return length

    def take_handshake(self, peer_ip: str, now: float | None = None) -> bool:
        if (p := self.penalties.get(peer_ip)) is not None:
            now = time.monotonic() if now is None else now
            if now < p[0]:
                return self._refuse("penalized")
            if now >= p[0] + p[1]:
                del self.penalties[peer_ip]  # served, and quiet as long again: forgotten
        if self.handshakes_by_peer[peer_ip] >= self.limits.handshakes_per_peer:
            return self._refuse("handshakes_per_peer")
        if self.handshakes >= self.limits.handshakes:
            return self._refuse("handshakes")
        self.handshakes_by_peer[peer_ip] += 1
        self.handshakes += 1
        return True

    def drop_handshake(self, peer_ip: str) -> None:
        self.handshakes_by_peer[peer_ip] -= 1
        if self.handshakes_by_peer[peer_ip] <= 0:
            del self.handshakes_by_peer[peer_ip]
        self.handshakes -= 1

    def take_tunnel(self, peer_ip: str, local: str) -> bool:
        key = (peer_ip, local)
        if self.tunnels_by_peer[key] >= self.limits.tunnels_per_peer:
            return self._refuse("tunnels_per_peer")
        if self.tunnels >= self.limits.tunnels:
            return self._refuse("tunnels")
        self.tunnels_by_peer[key] += 1
        self.tunnels += 1
        return True

    def drop_tunnel(self, peer_ip: str, local: str) -> None:
        key = (peer_ip, local)
        self.tunnels_by_peer[key] -= 1
        if self.tunnels_by_peer[key] <= 0:
            del self.tunnels_by_peer[key]
        self.tunnels -= 1

    def take_stream(self) -> bool:
        if self.streams >= self.limits.streams:
            return self._refuse("streams")
        self.streams += 1
        return True

    def drop_stream(self) -> None:
        self.streams -= 1

    def take_connect(self) -> bool:
        if self.pending_connects >= self.limits.pending_connects:
            return self._refuse("pending_connects")
        self.pending_connects += 1
        return True

    def drop_connect(self) -> None:
        self.pending_connects -= 1


class AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        a = self.admission
        refused = CounterMetricFamily(
            "veil_admission_refused",
            "Handshakes, tunnels and streams refused by a node-wide or per-peer limit",
            labels=["limit"],
        )
        for limit in (
            "handshakes_per_peer",
            "handshakes",
            "tunnels_per_peer",
            "tunnels",
            "streams",
            "pending_connects",
        ):
            refused.add_metric([limit], a.refused[limit])
        yield refused
        held = GaugeMetricFamily(
            "veil_admission_in_use", "What the limits count, now", labels=["limit"]
        )
        for limit, n in (
            ("handshakes", a.handshakes),
            ("tunnels", a.tunnels),
            ("streams", a.streams),
            ("pending_connects", a.pending_connects),
        ):
            held.add_metric([limit], n)
        yield held


def register(admission: Admission, registry: CollectorRegistry) -> None:
    registry.register(AdmissionCollector(admission))
