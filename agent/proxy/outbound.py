"""Outbound (15001): where a captured connection goes — decided purely, then done.

`route()` is a pure function of (source workload, original destination, snapshot): a service
VIP:port picks a random ready endpoint; a pod IP is that workload; a destination in the mesh
is reached over HBONE at `<pod IP>:15008` with `:authority <pod IP>:<port>`, expecting the
destination's SPIFFE identity; anything outside the mesh is passed through as plain TCP; a
service with no ready endpoint is refused. A service (or pod) bound to a waypoint
(`veil.dev/use-waypoint`) is reached through one of the waypoint's pods instead, with
`:authority` the address the app dialled (the VIP:port), expecting the waypoint's identity;
no ready waypoint pod means refused, never around it. A pod that one of its Services binds
to a waypoint, addressed by its IP, is reached through that waypoint too (its agent takes
nothing else; the waypoint applies no Service route to it). The I/O is
`outbound_listener.OutboundListener`'s.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from veil.core.ports import HBONE_PORT
from veil.core.spiffe import SpiffeId
from veil.core.state import GATEWAY_NAME_LABEL, MeshState, Service, Waypoint, Workload


class Kind(Enum):
    HBONE = "hbone"
    PASSTHROUGH = "passthrough"
    REJECT = "reject"


@dataclass(frozen=True)
class Route:
    kind: Kind
    address: tuple[str, int]  # what to dial: the pod's 15008 for HBONE, else the destination
    authority: str = ""  # HBONE :authority, <pod IP>:<port>
    identity: SpiffeId | None = None  # the identity the server must present
    workload: Workload | None = None
    service: Service | None = None
    reason: str = ""
    waypoint: Waypoint | None = None


Choose = Callable[[Sequence[tuple[Workload, int]]], tuple[Workload, int]]


def route(
    state: MeshState,
    source: Workload,
    dst: tuple[str, int],
    trust_domain: str,
    choose: Choose = random.choice,
) -> Route:
    ip, port = dst
    if ip.startswith("127."):
        # Capture never redirects loopback: this is a direct connection to the 15001
        # listener, and passing it on would connect the agent to itself, again and again.
        return Route(Kind.REJECT, dst, reason="a direct connection to the mesh agent's listener")
    service = None
    target: Workload | None
    hit = state.services_by_vip.get((ip, port))
    if hit is not None:
        service, sport = hit
        if (wp := state.service_waypoint(service)) is not None:
            return via_waypoint(state, wp, dst, trust_domain, choose, service=service)
        endpoints = state.endpoints(service, sport)
        if not endpoints:
            return Route(
                Kind.REJECT,
                dst,
                service=service,
                reason=f"service {service.namespace}/{service.name}:{port} has no ready endpoint",
            )
        target, port = choose(endpoints)
        ip = target.ip or ip
    else:
        target = state.workloads_by_ip.get(ip)
    if target is None:
        return Route(Kind.PASSTHROUGH, (ip, port), reason="destination is outside the mesh")
    if state.in_mesh(target) and (wp := state.workload_waypoint(target)) is not None:
        return via_waypoint(state, wp, (ip, port), trust_domain, choose, service=service)
    if state.in_mesh(target) and (wp := bound_waypoint(state, source, target)) is not None:
        # addressed by its IP (or through a Service without a waypoint) but bound to a
        # waypoint by one of its Services: its agent takes nothing else, so go through it
        return via_waypoint(state, wp, (ip, port), trust_domain, choose, service=service)
    if not state.in_mesh(target):
        return Route(
            Kind.PASSTHROUGH,
            (ip, port),
            workload=target,
            service=service,
            reason=f"{target.key} is not in the mesh",
        )
    return Route(
        Kind.HBONE,
        (ip, HBONE_PORT),
        authority=f"{ip}:{port}",
        identity=target.identity(trust_domain),
        workload=target,
        service=service,
    )


def bound_waypoint(state: MeshState, source: Workload, target: Workload) -> Waypoint | None:
    """The waypoint a pod's traffic must come through (the first by name when several of its
    Services use one), or None when there is none or the source is that waypoint."""
    bound = sorted(state.bound_waypoints(target), key=lambda w: (w.namespace, w.name))
    mine = (source.namespace, source.labels.get(GATEWAY_NAME_LABEL))
    if not bound or any(mine == (wp.namespace, wp.name) for wp in bound):
        return None
    return bound[0]


def via_waypoint(
    state: MeshState,
    wp: Waypoint,
    dst: tuple[str, int],
    trust_domain: str,
    choose: Choose,
    *,
    service: Service | None,
) -> Route:
    pods = state.waypoint_pods(wp)
    if not pods:
        return Route(
            Kind.REJECT,
            dst,
            service=service,
            waypoint=wp,
            reason=f"waypoint {wp.namespace}/{wp.name} has no ready pod",
        )
    pod, _ = choose([(p, HBONE_PORT) for p in pods])
    assert pod.ip is not None
    return Route(
        Kind.HBONE,
        (pod.ip, HBONE_PORT),
        authority=f"{dst[0]}:{dst[1]}",
        identity=wp.identity(trust_domain),
        workload=pod,
        service=service,
        waypoint=wp,
    )
