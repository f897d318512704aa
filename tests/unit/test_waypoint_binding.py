"""Which waypoint a Service or pod is bound to: `veil.dev/use-waypoint`, and with
`veil.dev/use-waypoint-namespace` a waypoint in another namespace, which must admit the
namespace through its HBONE listener's allowedRoutes (Istio's rule for cross-namespace use)."""

from __future__ import annotations

from typing import Any

import pytest

from veil.core.state import build_state


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def gateway(namespace: str, name: str, allowed: dict[str, Any] | None = None) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
    if allowed is not None:
        listener["allowedRoutes"] = {"namespaces": allowed}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"gatewayClassName": "veil-waypoint", "listeners": [listener]},
    }


def service(namespace: str, name: str, **labels: str) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"clusterIP": "10.96.0.20", "selector": {"app": name}, "ports": [{"port": 80}]},
    }


USE = {"veil.dev/use-waypoint": "shared", "veil.dev/use-waypoint-namespace": "infra"}


@pytest.mark.parametrize(
    ("allowed", "shop_labels", "bound"),
    [
        (None, {}, False),  # Same (the default): another namespace may not use it
        ({"from": "Same"}, {}, False),
        ({"from": "All"}, {}, True),
        ({"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}, {"team": "a"}, True),
        ({"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}, {"team": "b"}, False),
    ],
)
def test_a_waypoint_in_another_namespace_binds_only_if_it_admits_the_namespace(
    allowed: dict[str, Any] | None, shop_labels: dict[str, str], bound: bool
) -> None:
    state = build_state(
        [
            ns("infra"),
            ns("shop", **shop_labels),
            gateway("infra", "shared", allowed),
            service("shop", "catalog", **USE),
        ],
        1,
    )
    assert not state.errors
    (svc,) = state.services
    wp = state.service_waypoint(svc)
    assert (wp is not None and (wp.namespace, wp.name) == ("infra", "shared")) is bound


def test_the_namespace_label_pair_binds_every_service_of_the_namespace() -> None:
    state = build_state(
        [
            ns("infra"),
            ns("shop", **USE),
            gateway("infra", "shared", {"from": "All"}),
            service("shop", "catalog"),
            service("shop", "cart", **{"veil.dev/use-waypoint": "none"}),  # opts out
        ],
        1,
    )
    by_name = {s.name: state.service_waypoint(s) for s in state.services}
    assert by_name["catalog"] is not None and by_name["catalog"].namespace == "infra"
    assert by_name["cart"] is None


def test_without_the_namespace_label_the_waypoint_is_looked_up_in_the_same_namespace() -> None:
    state = build_state(
        [
            ns("infra"),
            ns("shop"),
            gateway("infra", "shared", {"from": "All"}),
            service("shop", "catalog", **{"veil.dev/use-waypoint": "shared"}),
        ],
        1,
    )
    assert state.service_waypoint(state.services[0]) is None  # no shop/shared


def test_a_bad_allowed_routes_value_is_an_error_of_the_gateway() -> None:
    state = build_state([ns("infra"), gateway("infra", "shared", {"from": "Everyone"})], 1)
    assert not state.waypoints and any("allowedRoutes" in e for e in state.invalid.values())
