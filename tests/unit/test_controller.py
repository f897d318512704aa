"""The waypoint controller's decisions (pure): what a Gateway of class veil-waypoint becomes,
its status, and the status Veil writes on policies and routes."""

from __future__ import annotations

from typing import Any

import pytest

from veil.controller.status import CONTROLLER_NAME, desired_status, differs
from veil.controller.waypoints import (
    Settings,
    gateway_status,
    is_waypoint,
    waypoint_objects,
    waypoints_binding,
)
from veil.core.state import build_state


def status_of(obj: dict[str, Any], state: Any, now: str) -> dict[str, Any]:
    got = desired_status(obj, state, now)
    assert got is not None
    return got


GATEWAY: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u-1", "generation": 2},
    "spec": {"gatewayClassName": "veil-waypoint"},
}
SETTINGS = Settings("ghcr.io/veil-dev/veil:0.1.0", "veil-ca.veil-system.svc:15012")


def test_a_waypoint_gateway_becomes_its_owned_objects():
    objs = {o["kind"]: o for o in waypoint_objects(GATEWAY, SETTINGS, "PEM")}
    assert set(objs) == {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
    for o in objs.values():
        (owner,) = o["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("Gateway", "u-1", True)
        assert o["metadata"]["namespace"] == "shop"
    pod = objs["Deployment"]["spec"]["template"]
    assert pod["metadata"]["labels"] == {
        "gateway.networking.k8s.io/gateway-name": "waypoint",
        "veil.dev/dataplane-mode": "none",  # a waypoint speaks HBONE itself
    }
    assert pod["spec"]["serviceAccountName"] == "waypoint"
    args = pod["spec"]["containers"][0]["args"]
    assert args[:3] == ["waypoint", "--gateway", "waypoint"]
    assert "in-cluster" in args and "veil-ca.veil-system.svc:15012" in args
    token = pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "veil-ca"
    assert objs["Service"]["spec"]["ports"][0]["port"] == 15008
    assert objs["ConfigMap"]["data"] == {"root-cert.pem": "PEM"}


def test_only_gateways_of_our_class_are_waypoints():
    assert is_waypoint(GATEWAY)
    assert not is_waypoint({**GATEWAY, "spec": {"gatewayClassName": "istio"}})
    other = {**GATEWAY, "spec": {"gatewayClassName": "nginx"}}
    binding = waypoints_binding([GATEWAY, other])
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "namespace": "shop", "name": "waypoint"}
    ]


def test_the_gateway_is_programmed_once_a_replica_is_ready_with_an_address():
    pending = gateway_status(GATEWAY, "10.96.0.9", 0, "t1")
    assert [c["status"] for c in pending["conditions"]] == ["True", "False"]
    done = gateway_status({**GATEWAY, "status": pending}, "10.96.0.9", 1, "t2")
    accepted, programmed = done["conditions"]
    assert programmed["status"] == "True" and programmed["lastTransitionTime"] == "t2"
    assert accepted["lastTransitionTime"] == "t1"  # unchanged status keeps its time
    assert accepted["observedGeneration"] == 2
    assert done["addresses"] == [{"type": "IPAddress", "value": "10.96.0.9"}]


def _policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", "generation": 1},
        "spec": spec,
    }


def test_a_policy_says_whether_it_is_in_force_and_why_not():
    good = _policy(
        "good", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}
    )
    bad = _policy("bad", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]})
    state = build_state([good, bad], 1)
    (ok,) = status_of(good, state, "t")["conditions"]
    assert (ok["type"], ok["status"], ok["reason"]) == ("Accepted", "True", "Accepted")
    (refused,) = status_of(bad, state, "t")["conditions"]
    assert (refused["status"], refused["reason"]) == ("False", "Invalid")
    assert "port" in refused["message"]


def _route(backends: list[dict[str, Any]], parent: str = "catalog") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop", "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent}],
            "rules": [{"backendRefs": backends}],
        },
    }


SERVICES = [
    {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "ports": [{"port": 9080}]},
    }
    for name, ns, ip in (("catalog", "shop", "10.96.0.5"), ("db", "data", "10.96.0.6"))
]


def _verdicts(route: dict[str, Any], *extra: dict[str, Any]) -> list[tuple[str, str, str]]:
    state = build_state([*SERVICES, *extra, route], 1)
    (parent,) = status_of(route, state, "t")["parents"]
    assert parent["controllerName"] == CONTROLLER_NAME
    return [(c["type"], c["status"], c["reason"]) for c in parent["conditions"]]


def test_route_parents_say_accepted_and_resolved_refs():
    assert _verdicts(_route([{"name": "catalog", "port": 9080}])) == [
        ("Accepted", "True", "Accepted"),
        ("ResolvedRefs", "True", "ResolvedRefs"),
    ]
    assert _verdicts(_route([{"name": "gone", "port": 9080}]))[1] == (
        "ResolvedRefs", "False", "BackendNotFound"
    )  # fmt: skip
    cross = _route([{"name": "db", "namespace": "data", "port": 9080}])
    assert _verdicts(cross)[1] == ("ResolvedRefs", "False", "RefNotPermitted")
    grant = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "data"},
        "spec": {
            "from": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}
            ],
            "to": [{"group": "", "kind": "Service"}],
        },
    }
    assert _verdicts(cross, grant)[1] == ("ResolvedRefs", "True", "ResolvedRefs")
    assert _verdicts(_route([{"name": "catalog", "port": 9080}], parent="nope"))[0] == (
        "Accepted", "False", "NoMatchingParent"
    )  # fmt: skip


def test_writing_the_same_verdict_again_is_no_change():
    route = _route([{"name": "catalog", "port": 9080}])
    state = build_state([*SERVICES, route], 1)
    first = status_of(route, state, "t1")
    assert differs(None, first)
    again = status_of({**route, "status": first}, state, "t2")
    assert not differs(first, again)
    assert again["parents"][0]["conditions"][0]["lastTransitionTime"] == "t1"
    other = {"parentRef": {"name": "x"}, "controllerName": "istio.io/gateway", "conditions": []}
    kept = status_of({**route, "status": {"parents": [other]}}, state, "t")
    assert kept["parents"][0] == other  # another controller's entry is left as it is


def test_waypoint_replicas_are_the_gateways_to_say_or_left_to_kubectl_scale():
    """`veil.dev/replicas` sets them; without it the Deployment has no `replicas` in what the
    controller applies (server-side), so `kubectl scale` or an HPA keep theirs."""
    dep = next(o for o in waypoint_objects(GATEWAY, SETTINGS, "PEM") if o["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]
    three = {
        **GATEWAY,
        "metadata": {**GATEWAY["metadata"], "annotations": {"veil.dev/replicas": "3"}},
    }
    dep = next(o for o in waypoint_objects(three, SETTINGS, "PEM") if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 3
    bad = {
        **GATEWAY,
        "metadata": {**GATEWAY["metadata"], "annotations": {"veil.dev/replicas": "many"}},
    }
    dep = next(o for o in waypoint_objects(bad, SETTINGS, "PEM") if o["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]
    accepted = gateway_status(bad, None, 0, "now")["conditions"][0]
    assert accepted["status"] == "True" and "veil.dev/replicas" in accepted["message"]


@pytest.mark.parametrize("kind", ["GRPCRoute", "TCPRoute"])
def test_grpc_and_tcp_routes_get_the_route_conditions_too(kind):
    good = {**_route([{"name": "catalog", "port": 9080}]), "kind": kind}
    assert _verdicts(good) == [
        ("Accepted", "True", "Accepted"),
        ("ResolvedRefs", "True", "ResolvedRefs"),
    ]
    gone = {**_route([{"name": "gone", "port": 9080}]), "kind": kind}
    assert _verdicts(gone)[1] == ("ResolvedRefs", "False", "BackendNotFound")


def test_a_route_of_another_kind_with_the_same_name_is_not_taken_for_it():
    tcp = {**_route([{"name": "catalog", "port": 9080}]), "kind": "TCPRoute"}
    tcp["spec"]["rules"] *= 2  # refused: a TCPRoute has exactly one rule
    http = _route([{"name": "catalog", "port": 9080}])
    state = build_state([*SERVICES, http, tcp], 1)
    (parent,) = status_of(tcp, state, "t")["parents"]
    accepted = parent["conditions"][0]
    assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedValue")
    assert "exactly one rule" in accepted["message"]
