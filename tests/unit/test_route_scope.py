"""Which HTTPRoutes apply to whom (GAMMA producer and consumer routes) and cross-namespace
backendRefs under ReferenceGrant (issue 17.15), pure; and the waypoint's answer."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from tests.support.hbone import FRONTEND
from tests.support.waypoint import DEST, Pipe, feed, waypoint, with_state
from veil.core.routes import (
    parse_reference_grant,
    parse_route,
    reference_granted,
    routes_for_client,
)
from veil.core.spiffe import SpiffeId
from veil.core.state import build_state
from veil.waypoint import pipeline
from veil.waypoint.pipeline import Caller


def route(ns: str, name: str, backend_ns: str, backend: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "catalog", "namespace": "shop"}
            ],
            "rules": [{"backendRefs": [{"name": backend, "namespace": backend_ns, "port": 80}]}],
        },
    }


PRODUCER = parse_route(route("shop", "catalog", "shop", "catalog-v2"))
ATTACKER = parse_route(route("attacker", "steal", "attacker", "evil"))


@pytest.mark.parametrize(
    ("client_ns", "expected"),
    [
        ("shop", ["shop/catalog"]),  # the producer route for the Service's own namespace
        ("frontend", ["shop/catalog"]),  # ... and for every other namespace
        ("attacker", ["attacker/steal"]),  # a consumer route: only for its own namespace
    ],
)
def test_a_route_from_another_namespace_steers_only_its_own_clients(client_ns, expected):
    got = routes_for_client([PRODUCER, ATTACKER], "shop", "catalog", 80, client_ns)
    assert [r.key for r in got] == expected


def grant(ns: str, from_ns: str, name: str | None = None) -> dict[str, Any]:
    to: dict[str, Any] = {"group": "", "kind": "Service"}
    if name:
        to["name"] = name
    return {
        "kind": "ReferenceGrant",
        "metadata": {"namespace": ns, "name": "g"},
        "spec": {
            "from": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": from_ns}
            ],
            "to": [to],
        },
    }


@pytest.mark.parametrize(
    ("objects", "allowed"),
    [
        ([], False),
        ([grant("backend", "shop")], True),
        ([grant("backend", "shop", "api")], True),
        ([grant("backend", "shop", "other")], False),  # names another Service
        ([grant("backend", "elsewhere")], False),  # grants another namespace
        ([grant("shop", "shop")], False),  # must live in the target namespace
    ],
)
def test_cross_namespace_backends_need_a_reference_grant(objects, allowed):
    grants = [parse_reference_grant(o) for o in objects if o["kind"] == "ReferenceGrant"]
    assert reference_granted(grants, "shop", "backend", "api") is allowed
    assert reference_granted([], "shop", "shop", "api")  # same namespace: always


def test_a_consumer_route_may_send_to_its_own_parent_service_without_a_grant():
    """Gateway API's MeshConsumerRoute: a route in the consumer's namespace, parentRef and
    backendRef the producer's Service, no ReferenceGrant: the consumer could dial it anyway."""
    parents = [("backend", "api")]
    assert reference_granted([], "shop", "backend", "api", parents)
    assert not reference_granted([], "shop", "backend", "other", parents)  # another Service


async def test_the_waypoint_answers_500_for_an_ungranted_backend(tmp_path):
    wp = waypoint(tmp_path)
    with_state(wp, route("shop", "catalog", "backend", "api"))
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, pipe, b"GET / HTTP/1.1\r\nHost: catalog\r\n\r\n")
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))  # type: ignore[arg-type]
    assert bytes(pipe.out).startswith(b"HTTP/1.1 500 ")
    assert b"ReferenceGrant" in bytes(pipe.out)


# -- regular expressions run on RE2 (issue 17.16) ------------------------------------------------


def regex_route(pattern: str) -> dict[str, Any]:
    r = route("shop", "re", "shop", "catalog")
    r["spec"]["rules"][0]["matches"] = [{"path": {"type": "RegularExpression", "value": pattern}}]
    return r


def test_a_catastrophic_pattern_runs_in_linear_time():
    """`(a+)+$` on Python's backtracking `re` takes ~2^n steps for n a's and no match."""
    import time  # noqa: PLC0415

    m = parse_route(regex_route("/(a+)+$")).rules[0].matches[0]
    started = time.process_time()
    assert not m.path.matches("/" + "a" * 5000 + "!")
    assert time.process_time() - started < 1.0  # `re` would not finish in our lifetime


@pytest.mark.parametrize("pattern", ["/(a)\\1", "/(?=x)y", "/(?<!a)b", "/[z-a]"])
def test_patterns_re2_refuses_are_rejected_with_its_reason(pattern):
    from veil.core.routes import RouteError  # noqa: PLC0415

    with pytest.raises(RouteError, match="RE2"):
        parse_route(regex_route(pattern))


# -- TCPRoute (issue 22.2) ---------------------------------------------------------------------


def tcp_route(name: str, backends: list[dict[str, Any]], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "TCPRoute",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "catalog", "namespace": "shop", "port": 80}
            ],
            "rules": [{"backendRefs": backends}],
        },
    }


def tcp_state(*objects: dict[str, Any]):
    base = [{"kind": "Namespace", "metadata": {"name": n}} for n in ("shop", "backend", "other")]
    svcs = [
        {
            "kind": "Service",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": vip, "ports": [{"port": 80}, {"port": 9000}]},
        }
        for ns, name, vip in (
            ("shop", "catalog", "10.96.0.5"),
            ("shop", "v2", "10.96.0.6"),
            ("backend", "api", "10.96.0.9"),
        )
    ]
    return build_state([*base, *svcs, *objects], 1)


def decide(state, port: int = 80, client_ns: str = "shop", seed: int = 1):
    svc = state.service("shop", "catalog")
    dest = pipeline.Destination(f"10.96.0.5:{port}", svc, port)
    caller = pipeline.Caller(SpiffeId("cluster.local", client_ns, "client"), "10.244.1.5")
    return pipeline.tcp_backend(state, dest, caller, random.Random(seed))


def test_a_tcp_route_splits_connections_by_weight():
    state = tcp_state(
        tcp_route(
            "split",
            [
                {"name": "catalog", "port": 80, "weight": 3},
                {"name": "v2", "port": 9000, "weight": 1},
            ],
        )
    )
    picks = [decide(state, seed=i) for i in range(400)]
    got = {(s.name, p) for s, p in picks}
    assert got == {("catalog", 80), ("v2", 9000)}  # each backendRef with its own port
    share = sum(s.name == "v2" for s, _ in picks) / 400
    assert 0.17 < share < 0.33


def test_without_a_tcp_route_the_service_takes_it_and_other_ports_are_not_routed():
    state = tcp_state(tcp_route("split", [{"name": "v2", "port": 9000}]))
    assert decide(tcp_state()) is None
    assert decide(state, port=9000) is None  # the route names port 80 only


def test_a_consumer_tcp_route_applies_to_its_own_namespace_only():
    state = tcp_state(
        tcp_route("mine", [{"name": "catalog", "namespace": "shop", "port": 9000}], ns="other")
    )
    assert decide(state, client_ns="shop") is None
    hit = decide(state, client_ns="other")
    assert hit is not None and not isinstance(hit, str) and hit[1] == 9000


def test_tcp_route_refusals_name_the_reason():
    assert "ReferenceGrant" in str(
        decide(tcp_state(tcp_route("x", [{"name": "api", "namespace": "backend", "port": 80}])))
    )
    assert "no backend with weight" in str(
        decide(tcp_state(tcp_route("x", [{"name": "v2", "port": 80, "weight": 0}])))
    )
    assert "unknown" in str(decide(tcp_state(tcp_route("x", [{"name": "nope", "port": 80}]))))


def test_an_invalid_tcp_route_is_named_in_the_state():
    two = tcp_route("two", [{"name": "v2", "port": 80}])
    two["spec"]["rules"].append({"backendRefs": [{"name": "v2", "port": 80}]})
    state = tcp_state(two)
    assert state.tcp_routes == ()
    assert "exactly one rule" in state.invalid[("TCPRoute", "shop", "two")]
