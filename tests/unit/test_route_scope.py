"""Which HTTPRoutes apply to whom (GAMMA producer and consumer routes) and cross-namespace
backendRefs under ReferenceGrant (issue 17.15), pure; and the waypoint's answer."""

from __future__ import annotations

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
            await wp.serve_stream(pipe, DEST, FRONTEND, "10.244.1.5")  # type: ignore[arg-type]
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
