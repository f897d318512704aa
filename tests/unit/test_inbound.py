"""Inbound admission (15008 CONNECT, 15006 plaintext) as pure decisions (issue 18.3)."""

from __future__ import annotations

from typing import Any

import pytest

from veil.agent.proxy.inbound import PodFacts, admit_connect, admit_plaintext
from veil.core.authz import parse_policy
from veil.core.hbone import BadRequest, ConnectRequest
from veil.core.spiffe import SpiffeId
from veil.core.state import Waypoint, Workload

TD = "cluster.local"
CLIENT = SpiffeId(TD, "shop", "frontend")
WAYPOINT_ID = SpiffeId(TD, "shop", "waypoint")
WP = Waypoint("shop", "waypoint")
POD = Workload("shop", "cart-0", "node1", "cart", "10.244.1.7", labels={"app": "cart"})


def pod(bound: bool = False) -> PodFacts:
    if not bound:
        return PodFacts(POD, "10.244.1.7")
    return PodFacts(POD, "10.244.1.7", frozenset({WP}), frozenset({WAYPOINT_ID}))


def policy(action: str, rule: dict[str, Any]) -> Any:
    return parse_policy(
        {
            "apiVersion": "security.veil.dev/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "shop", "name": action.lower()},
            "spec": {"action": action, "rules": [rule]},
        }
    )


DENY_FRONTEND = policy("DENY", {"from": [{"source": {"principals": [CLIENT.istio_principal]}}]})
ALLOW_FRONTEND = policy("ALLOW", {"from": [{"source": {"principals": [CLIENT.istio_principal]}}]})
ALLOW_PORT_80 = policy("ALLOW", {"to": [{"operation": {"ports": ["80"]}}]})


def connect(target: tuple[str, int]) -> ConnectRequest:
    return ConnectRequest(1, target, {})


@pytest.mark.parametrize(
    ("req", "facts", "policies", "peer", "status", "why"),
    [
        (connect(("10.244.1.7", 8080)), pod(), [], CLIENT, 200, ""),
        (BadRequest(1, "method 'GET' is not CONNECT"), pod(), [], CLIENT, 400, "not CONNECT"),
        (connect(("10.244.1.8", 8080)), pod(), [], CLIENT, 400, "is not this pod"),
        (connect(("10.244.1.7", 15006)), pod(), [], CLIENT, 400, "agent's own"),
        (connect(("10.244.1.7", 15008)), pod(), [], CLIENT, 400, "agent's own"),
        (connect(("10.244.1.7", 8080)), pod(bound=True), [], CLIENT, 401, "waypoint bypass"),
        (connect(("10.244.1.7", 8080)), pod(bound=True), [], WAYPOINT_ID, 200, ""),
        (connect(("10.244.1.7", 8080)), pod(), [DENY_FRONTEND], CLIENT, 401, "DENY rule"),
        (connect(("10.244.1.7", 8080)), pod(), [ALLOW_FRONTEND], CLIENT, 200, ""),
        (connect(("10.244.1.7", 8080)), pod(), [ALLOW_PORT_80], CLIENT, 401, "no rule"),
        (connect(("10.244.1.7", 80)), pod(), [ALLOW_PORT_80], CLIENT, 200, ""),
        # the waypoint's traffic is judged by the pod's policies too
        (connect(("10.244.1.7", 8080)), pod(True), [ALLOW_FRONTEND], WAYPOINT_ID, 401, "no rule"),
    ],
)
def test_connect_admission(req, facts, policies, peer, status, why):
    v = admit_connect(req, facts, policies, peer, "10.244.2.9")
    assert (v.status, v.allowed) == (status, status == 200)
    assert why in v.why
    assert v.self_call == ("agent's own" in why)


@pytest.mark.parametrize(
    ("port", "facts", "policies", "status", "why"),
    [
        (8080, pod(), [], 200, ""),
        (15006, pod(), [], 400, "agent's own"),
        (8080, pod(bound=True), [], 401, "waypoint bypass"),  # plaintext is never the waypoint
        (8080, pod(), [ALLOW_FRONTEND], 401, "no rule"),  # no principal without mTLS
        (80, pod(), [ALLOW_PORT_80], 200, ""),
    ],
)
def test_plaintext_admission(port, facts, policies, status, why):
    v = admit_plaintext(("10.244.1.7", port), facts, policies, "10.244.2.9")
    assert v.status == status and why in v.why
    assert (v.decision is not None) == (status != 400 and "bypass" not in why)
