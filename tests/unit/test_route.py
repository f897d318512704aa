"""The outbound routing decision, table-tested without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from agent.proxy.outbound import Kind, route
from agent.state.model import build_state

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
