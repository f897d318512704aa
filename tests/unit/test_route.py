"""The outbound routing decision, table-tested without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from veil.agent.proxy.outbound import Kind, route
from veil.core.state import build_state

TD = "cluster.local"


def pod(
    ns: str,
    name: str,
    ip: str,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    sa: str = "default",
    ports: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {
            "nodeName": "node1",
            "serviceAccountName": sa,
            "containers": [
                {
                    "name": "c",
                    "ports": [{"name": k, "containerPort": v} for k, v in (ports or {}).items()],
                }
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": str(ready)}],
        },
    }


STATE = build_state(
    [
        {
            "kind": "Namespace",
            "metadata": {"name": "mesh", "labels": {"veil.dev/dataplane-mode": "ambient"}},
        },
        {"kind": "Namespace", "metadata": {"name": "plain"}},
        pod("mesh", "client", "10.244.1.10", sa="client"),
        pod("mesh", "web-0", "10.244.1.11", {"app": "web"}, sa="web", ports={"http": 8080}),
        pod("mesh", "web-1", "10.244.2.11", {"app": "web"}, sa="web", ports={"http": 8080}),
        pod("mesh", "web-2", "10.244.2.12", {"app": "web"}, ready=False, sa="web"),
        pod("mesh", "optout", "10.244.2.13", {"veil.dev/dataplane-mode": "none"}),
        pod("plain", "legacy", "10.244.2.14", {"app": "legacy"}),
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "mesh"},
            "spec": {
                "clusterIP": "10.96.0.10",
                "selector": {"app": "web"},
                "ports": [{"port": 80, "targetPort": "http"}],
            },
        },
        {
            "kind": "Service",
            "metadata": {"name": "legacy", "namespace": "plain"},
            "spec": {
                "clusterIP": "10.96.0.11",
                "selector": {"app": "legacy"},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        },
        {
            "kind": "Service",
            "metadata": {"name": "empty", "namespace": "mesh"},
            "spec": {
                "clusterIP": "10.96.0.12",
                "selector": {"app": "nothing"},
                "ports": [{"port": 80}],
            },
        },
    ],
    1,
)
_client = STATE.workload("mesh", "client")
assert _client is not None
CLIENT = _client


@pytest.mark.parametrize(
    ("dst", "kind", "address", "authority", "identity"),
    [
        # a mesh pod by IP: HBONE to its 15008, authority keeps the real port
        (
            ("10.244.2.11", 8080),
            Kind.HBONE,
            ("10.244.2.11", 15008),
            "10.244.2.11:8080",
            "spiffe://cluster.local/ns/mesh/sa/web",
        ),
        # a pod outside the mesh, by IP or through its VIP: plain TCP to the pod
        (("10.244.2.14", 8080), Kind.PASSTHROUGH, ("10.244.2.14", 8080), "", None),
        (("10.96.0.11", 80), Kind.PASSTHROUGH, ("10.244.2.14", 8080), "", None),
        # an opted-out pod in an enrolled namespace: passthrough
        (("10.244.2.13", 8080), Kind.PASSTHROUGH, ("10.244.2.13", 8080), "", None),
        # unknown addresses (outside the cluster): passthrough to where the app was going
        (("192.0.2.7", 443), Kind.PASSTHROUGH, ("192.0.2.7", 443), "", None),
        # a VIP with no ready endpoint: refused
        (("10.96.0.12", 80), Kind.REJECT, ("10.96.0.12", 80), "", None),
        # a VIP port the service does not have: not a service address, nothing there
        (("10.96.0.10", 81), Kind.PASSTHROUGH, ("10.96.0.10", 81), "", None),
        # loopback is never captured: an app that dialled 127.0.0.1:15001 itself is refused
        # (passed on, the agent would connect to its own listener, over and over)
        (("127.0.0.1", 15001), Kind.REJECT, ("127.0.0.1", 15001), "", None),
    ],
)
def test_route_table(dst, kind, address, authority, identity):
    r = route(STATE, CLIENT, dst, TD, choose=lambda eps: eps[0])
    assert r.kind is kind, r.reason
    assert r.address == address
    assert r.authority == authority
    assert (str(r.identity) if r.identity else None) == identity


def test_vip_picks_among_ready_endpoints_with_the_named_target_port():
    picked = set()
    for i in range(2):

        def nth(eps, i=i):
            return eps[i]

        r = route(STATE, CLIENT, ("10.96.0.10", 80), TD, choose=nth)
        assert r.kind is Kind.HBONE and r.service is not None and r.service.name == "web"
        picked.add(r.authority)
    assert picked == {"10.244.1.11:8080", "10.244.2.11:8080"}  # never the unready web-2
    seen = {route(STATE, CLIENT, ("10.96.0.10", 80), TD).authority for _ in range(200)}
    assert seen == picked  # random.choice spreads over both


def gateway(ns: str, name: str, wfor: str | None = None) -> dict[str, Any]:
    return {
        "kind": "Gateway",
        "apiVersion": "gateway.networking.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"veil.dev/waypoint-for": wfor} if wfor else {},
        },
        "spec": {
            "gatewayClassName": "veil-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def waypoint_state(
    ns_labels: dict[str, str], svc_labels: dict[str, str], wfor: str | None = None, ready=True
):
    return build_state(
        [
            {"kind": "Namespace", "metadata": {"name": "mesh", "labels": ns_labels}},
            pod("mesh", "client", "10.244.1.10", sa="client"),
            pod("mesh", "web-0", "10.244.1.11", {"app": "web"}, sa="web"),
            pod(
                "mesh",
                "wp-0",
                "10.244.2.20",
                {"gateway.networking.k8s.io/gateway-name": "wp", "veil.dev/dataplane-mode": "none"},
                ready=ready,
                sa="wp",
            ),
            gateway("mesh", "wp", wfor),
            {
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "mesh", "labels": svc_labels},
                "spec": {
                    "clusterIP": "10.96.0.10",
                    "selector": {"app": "web"},
                    "ports": [{"port": 80, "targetPort": 8080}],
                },
            },
        ],
        1,
    )


AMB = {"veil.dev/dataplane-mode": "ambient"}
USE = {"veil.dev/use-waypoint": "wp"}


@pytest.mark.parametrize(
    ("ns_labels", "svc_labels", "wfor", "via"),
    [
        ({**AMB, **USE}, {}, None, True),  # namespace opts in: services go through it
        (AMB, USE, None, True),  # the Service opts in
        ({**AMB, **USE}, {"veil.dev/use-waypoint": "none"}, None, False),  # the Service opts out
        (AMB, {"veil.dev/use-waypoint": "other"}, None, False),  # no such waypoint
        # a workload waypoint: the VIP picks the pod, then the pod's waypoint takes it
        ({**AMB, **USE}, {}, "workload", "10.244.1.11:8080"),
        ({**AMB, **USE}, {}, "all", True),
    ],
)
def test_service_traffic_goes_through_its_waypoint(ns_labels, svc_labels, wfor, via):
    state = waypoint_state(ns_labels, svc_labels, wfor)
    client = state.workload("mesh", "client")
    r = route(state, client, ("10.96.0.10", 80), TD, choose=lambda eps: eps[0])
    assert r.kind is Kind.HBONE
    if via:
        assert r.address == ("10.244.2.20", 15008)
        # the service's waypoint picks the backend; a workload's gets the chosen pod
        assert r.authority == ("10.96.0.10:80" if via is True else via)
        assert str(r.identity) == "spiffe://cluster.local/ns/mesh/sa/wp"
        assert r.waypoint is not None and r.waypoint.name == "wp"
    else:
        assert r.address == ("10.244.1.11", 15008) and r.waypoint is None


def test_pod_traffic_goes_through_the_waypoint_the_pod_is_bound_to():
    state = waypoint_state({**AMB, **USE}, {}, "workload")
    client = state.workload("mesh", "client")
    r = route(state, client, ("10.244.1.11", 8080), TD, choose=lambda eps: eps[0])
    assert r.address == ("10.244.2.20", 15008) and r.authority == "10.244.1.11:8080"
    # a service waypoint: the pod's agent takes only what comes through it (no bypass), so
    # traffic to the pod's IP goes there as well (GAMMA's MeshFrontend sends to a pod IP)
    state = waypoint_state({**AMB, **USE}, {}, "service")
    r = route(state, state.workload("mesh", "client"), ("10.244.1.11", 8080), TD)
    assert r.address == ("10.244.2.20", 15008) and r.authority == "10.244.1.11:8080"
    assert str(r.identity) == "spiffe://cluster.local/ns/mesh/sa/wp"
    # ... but not from the waypoint itself, nor where bypass is allowed
    r = route(state, state.workload("mesh", "wp-0"), ("10.244.1.11", 8080), TD)
    assert r.address == ("10.244.1.11", 15008) and r.waypoint is None
    allow = {"veil.dev/allow-waypoint-bypass": "true"}
    state = waypoint_state({**AMB, **USE}, allow, "service")
    r = route(state, state.workload("mesh", "client"), ("10.244.1.11", 8080), TD)
    assert r.address == ("10.244.1.11", 15008) and r.waypoint is None


def test_no_ready_waypoint_pod_refuses_rather_than_bypassing():
    state = waypoint_state({**AMB, **USE}, {}, ready=False)
    r = route(state, state.workload("mesh", "client"), ("10.96.0.10", 80), TD)
    assert r.kind is Kind.REJECT and "waypoint mesh/wp has no ready pod" in r.reason


def test_waypoint_bound_pods_know_their_waypoint():
    state = waypoint_state({**AMB, **USE}, {}, "all")
    web = state.workload("mesh", "web-0")
    wp = state.workload("mesh", "wp-0")
    assert {w.name for w in state.bound_waypoints(web)} == {"wp"}
    assert state.bound_waypoints(wp) == set()  # the waypoint's own pod is not bound to itself


def test_bypass_can_be_allowed_explicitly():
    allow = {"veil.dev/allow-waypoint-bypass": "true"}
    state = waypoint_state({**AMB, **USE, **allow}, {}, "all")
    assert state.bound_waypoints(state.workload("mesh", "web-0")) == set()
    state = waypoint_state({**AMB, **USE}, allow, "service")  # on the Service
    assert state.bound_waypoints(state.workload("mesh", "web-0")) == set()
    # the traffic addressed to the service still goes through the waypoint
    r = route(state, state.workload("mesh", "client"), ("10.96.0.10", 80), TD)
    assert r.address == ("10.244.2.20", 15008)
