"""Inbound (15008 HBONE and 15006 plaintext): whether a connection may reach the pod, decided
purely, then done by `inbound_listener.InboundListener`.

`admit_connect()` judges a CONNECT stream: malformed (400), not addressed to this pod or to
one of the agent's own ports (400), coming around the pod's waypoint (401), or denied by an
AuthorizationPolicy (401); otherwise it may go on (200) and the driver connects to the app.
`admit_plaintext()` judges a connection from outside the mesh on 15006 the same way, minus
what only HBONE has. Both are functions of (the request's facts, the pod as the snapshot has
it, the policies in force): table-tested without sockets (tests/unit/test_inbound.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from veil.core.authz import Decision, Facts, Policy, decide
from veil.core.hbone import BadRequest, ConnectRequest
from veil.core.ports import AGENT_PORTS
from veil.core.spiffe import SpiffeId
from veil.core.state import Waypoint, Workload


@dataclass(frozen=True)
class PodFacts:
    """What inbound decisions need of the pod, from one snapshot."""

    workload: Workload  # as the snapshot has it now (labels change while pods run)
    ip: str
    bound: frozenset[Waypoint] = frozenset()  # waypoints its traffic must come through
    waypoint_ids: frozenset[SpiffeId] = frozenset()  # their identities


@dataclass(frozen=True)
class Verdict:
    """200: go on; 400: refused as malformed or misaddressed; 401: denied. `decision` is the
    policy decision when one was taken (for the log, the metrics and the access log)."""

    status: int
    why: str = ""
    decision: Decision | None = None
    self_call: bool = False  # addressed to one of the agent's own ports

    @property
    def allowed(self) -> bool:
        return self.status == 200


def bypass(pod: PodFacts, peer: SpiffeId | None) -> str | None:
    """Why a connection may not reach the pod directly: it is bound to a waypoint (its own or
    a Service's) and the peer is not that waypoint. None: it may."""
    if not pod.bound or peer in pod.waypoint_ids:
        return None
    names = ", ".join(sorted(f"{wp.namespace}/{wp.name}" for wp in pod.bound))
    return f"waypoint bypass: traffic to {pod.workload.key} must come through {names}"


def facts(pod: PodFacts, source_ip: str, port: int, principal: str | None) -> Facts:
    return Facts(
        source_ip=source_ip,
        destination_ip=pod.ip,
        destination_port=port,
        principal=principal,
        destination_labels=pod.workload.labels,
        destination_namespace=pod.workload.namespace,
    )


def judge(
    pod: PodFacts,
    policies: Iterable[Policy],
    peer: SpiffeId | None,
    peer_ip: str,
    port: int,
) -> Verdict:
    why = bypass(pod, peer)
    if why is not None:
        return Verdict(401, why)  # no policy decided it: `decision` stays None
    d = decide(policies, facts(pod, peer_ip, port, peer.istio_principal if peer else None))
    if not d.allowed:
        return Verdict(401, d.reason, d)
    return Verdict(200, "", d)


def admit_connect(
    req: ConnectRequest | BadRequest,
    pod: PodFacts,
    policies: Iterable[Policy],
    peer: SpiffeId,
    peer_ip: str,
) -> Verdict:
    """A CONNECT stream arriving on the pod's 15008 from `peer` (its verified identity)."""
    if isinstance(req, BadRequest):
        return Verdict(400, req.why)
    host, port = req.target
    if host != pod.ip:
        return Verdict(400, f"authority {host}:{port} is not this pod ({pod.ip})")
    if port in AGENT_PORTS:
        return Verdict(400, f"port {port} is the mesh agent's own", self_call=True)
    return judge(pod, policies, peer, peer_ip, port)


def admit_plaintext(
    dst: tuple[str, int], pod: PodFacts, policies: Iterable[Policy], peer_ip: str
) -> Verdict:
    """A plaintext connection captured on the pod's 15006 (a client outside the mesh)."""
    if dst[1] in AGENT_PORTS:
        # Passed on, the agent would connect to itself, and that connection again.
        return Verdict(400, f"port {dst[1]} is the mesh agent's own", self_call=True)
    return judge(pod, policies, None, peer_ip, dst[1])
