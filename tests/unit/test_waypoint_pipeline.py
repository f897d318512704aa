"""The waypoint's request pipeline as a pure function (issue 18, item 4): a request and a
state in, a Plan, a Redirect or a Reply out; no sockets, no waypoint process."""

from __future__ import annotations

import random
from typing import Any

import h11
import pytest

from tests.support.hbone import FRONTEND
from tests.support.jwt import Issuer
from tests.support.waypoint import service_policy
from veil.core.spiffe import SpiffeId
from veil.core.state import build_state
from veil.runtime.sources.jwks import fetch_jwks
from veil.waypoint import pipeline
from veil.waypoint.pipeline import Caller, Plan, Redirect, Reply

ME = pipeline.ThisWaypoint("shop", "waypoint", "cluster.local")
CALLER = Caller(FRONTEND, "10.244.1.5")


def svc(ns: str, name: str, vip: str, port: int = 80) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": vip, "ports": [{"port": port}], "selector": {"app": name}},
    }


def route(name: str, rule: dict[str, Any], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "catalog", "namespace": "shop"}
            ],
            "rules": [rule],
        },
    }


def traffic(name: str, kind: str, target: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "traffic.veil.dev/v1",
        "kind": "TrafficPolicy",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"targetRefs": [{"group": "", "kind": kind, "name": target}], **spec},
    }


BASE = [
    {
        "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"veil.dev/use-waypoint": "waypoint"}},
    },
    {
        "kind": "Gateway",
        "metadata": {"namespace": "shop", "name": "waypoint"},
        "spec": {"gatewayClassName": "veil-waypoint"},
    },
    svc("shop", "catalog", "10.96.0.5"),
    svc("shop", "catalog-v2", "10.96.0.6", 8080),
    svc("backend", "api", "10.96.0.9"),
]


def run(*objects: dict[str, Any], wire: str = "GET /items?x=1 HTTP/1.1", headers=()) -> Any:
    state = build_state([*BASE, *objects], 1, fetch_jwks)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str), dest
    method, target, _ = wire.split(" ")
    req = h11.Request(method=method, target=target, headers=[("host", "catalog"), *headers])
    return pipeline.plan(state, ME, dest, CALLER, req, rng=random.Random(7))


def test_without_routes_the_request_goes_to_the_addressed_service():
    p = run(headers=[("connection", "keep-alive"), ("x-app", "1")])
    assert isinstance(p, Plan)
    assert (p.backend.name if p.backend else None, p.port, p.target) == (
        "catalog",
        80,
        b"/items?x=1",
    )
    names = [n for n, _ in p.headers]
    assert "connection" not in names and "x-app" in names and "traceparent" in names
    assert p.traceparent.startswith("00-") and p.retry.attempts == 0


@pytest.mark.parametrize(
    ("objects", "wire", "status", "flags"),
    [
        ((), "GET /a%2 HTTP/1.1", 400, "DPE"),  # a target without one meaning
        ((service_policy("no-get", "DENY", {"methods": ["GET"]}),), "GET / HTTP/1.1", 403, "RBAC"),
        (
            (service_policy("no-admin", "DENY", {"paths": ["/admin"]}),),
            "GET //admin HTTP/1.1",
            403,
            "RBAC",
        ),
        (
            (route("r", {"matches": [{"path": {"type": "Exact", "value": "/x"}}]}),),
            "GET /y HTTP/1.1",
            404,
            "NR",
        ),
        (
            (route("r", {"backendRefs": [{"name": "api", "namespace": "backend", "port": 80}]}),),
            "GET / HTTP/1.1",
            500,
            "NR",
        ),
    ],
)
def test_the_waypoint_answers_itself(objects, wire, status, flags):
    r = run(*objects, wire=wire)
    assert isinstance(r, Reply) and (r.status, r.flags) == (status, flags), r


def test_audit_policies_are_recorded_and_change_nothing():
    """Istio's AUDIT action at the waypoint: a matching AUDIT policy goes with the outcome
    (the access log's `audit`, veil_authz_audited_total), allowed or denied; none else."""
    audit = service_policy("watch-admin", "AUDIT", {"paths": ["/admin*"]})
    deny = service_policy("no-post", "DENY", {"methods": ["POST"]})
    allowed = run(audit, deny, wire="GET /admin/x HTTP/1.1")
    assert isinstance(allowed, Plan) and allowed.audited == ("shop/watch-admin",)
    denied = run(audit, deny, wire="POST /admin/x HTTP/1.1")
    assert isinstance(denied, Reply) and denied.status == 403
    assert denied.audited == ("shop/watch-admin",)
    assert run(audit, deny, wire="GET /items HTTP/1.1").audited == ()


def test_a_denied_path_is_judged_in_its_normalized_spelling():
    r = run(
        service_policy("no-admin", "DENY", {"paths": ["/admin"]}), wire="GET /./%61dmin HTTP/1.1"
    )
    assert isinstance(r, Reply) and r.status == 403 and r.path == "/admin"


def test_a_token_is_checked_and_stripped_before_routing():
    iss = Issuer()
    authn = {
        "apiVersion": "security.veil.dev/v1",
        "kind": "RequestAuthentication",
        "metadata": {"namespace": "shop", "name": "jwt"},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "catalog"}],
            "jwtRules": [{"issuer": iss.iss, "jwks": iss.jwks()}],
        },
    }
    bad = run(authn, headers=[("authorization", "Bearer not.a.token")])
    assert isinstance(bad, Reply) and bad.status == 401
    ok = run(authn, headers=[("authorization", "Bearer " + iss.token())])
    assert isinstance(ok, Plan)
    assert "authorization" not in {n for n, _ in ok.headers}  # forwardOriginalToken: false


def test_a_route_picks_its_backend_rewrites_and_sets_retries_and_timeouts():
    r = route(
        "v2",
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/items"}}],
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "hostname": "v2.internal",
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2/items"},
                    },
                }
            ],
            "backendRefs": [{"name": "catalog-v2", "port": 8080}],
            "timeouts": {"request": "3s", "backendRequest": "1s"},
        },
    )
    p = run(r, traffic("retry", "Service", "catalog", retry={"attempts": 2, "codes": [503]}))
    assert isinstance(p, Plan)
    assert (p.route, p.backend.name if p.backend else None, p.port) == (
        "shop/v2",
        "catalog-v2",
        8080,
    )
    assert p.target == b"/v2/items?x=1" and p.path == "/items?x=1"
    assert ("host", "v2.internal") in p.headers
    assert (p.timeout, p.backend_timeout) == (3.0, 1.0)
    assert p.retry.attempts == 2  # the Service's TrafficPolicy: the rule has none


def test_a_redirect_keeps_the_limits_of_the_route_then_the_service():
    r = route(
        "old",
        {
            "filters": [
                {
                    "type": "RequestRedirect",
                    "requestRedirect": {
                        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}
                    },
                }
            ]
        },
    )
    out = run(
        r,
        traffic("svc-rate", "Service", "catalog", rateLimit={"requestsPerSecond": 5, "burst": 5}),
        traffic("route-rate", "HTTPRoute", "old", rateLimit={"requestsPerSecond": 1, "burst": 1}),
    )
    assert isinstance(out, Redirect)
    assert out.location == "http://catalog/new?x=1" and out.status == 302
    assert [p.name for p in out.limits] == ["route-rate", "svc-rate"]


def test_a_mirror_in_another_namespace_needs_a_grant():
    r = route(
        "m",
        {
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": "api", "namespace": "backend", "port": 80}
                    },
                }
            ],
            "backendRefs": [{"name": "catalog", "port": 80}],
        },
    )
    grant = {
        "kind": "ReferenceGrant",
        "metadata": {"namespace": "backend", "name": "g"},
        "spec": {
            "from": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}
            ],
            "to": [{"group": "", "kind": "Service"}],
        },
    }
    without = run(r)
    assert isinstance(without, Plan) and without.mirrors == ()
    granted = run(r, grant)
    assert isinstance(granted, Plan) and [m.name for m in granted.mirrors] == ["api"]


def test_tcp_is_judged_by_the_same_policies():
    state = build_state([*BASE, service_policy("no-tcp", "DENY", {"ports": ["80"]})], 1)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    assert "RBAC: access denied (shop/no-tcp" in (
        pipeline.tcp_denied(state, ME, dest, CALLER) or ""
    )
    open_state = build_state(BASE, 1)
    assert pipeline.tcp_denied(open_state, ME, dest, CALLER) is None


def test_each_weighted_backend_keeps_its_own_port():
    """Issue 22: `[{name: catalog-v2, port: 80}, {name: catalog-v2, port: 8080}]` always went
    to the first port any route listed for that Service."""
    r = route(
        "split",
        {
            "backendRefs": [
                {"name": "catalog-v2", "port": 80, "weight": 1},
                {"name": "catalog-v2", "port": 8080, "weight": 1},
            ]
        },
    )
    state = build_state([*BASE, r], 1)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    req = h11.Request(method="GET", target="/", headers=[("host", "catalog")])
    ports = set()
    for seed in range(40):
        p = pipeline.plan(state, ME, dest, CALLER, req, rng=random.Random(seed))
        assert isinstance(p, Plan)
        ports.add(p.port)
    assert ports == {80, 8080}


def test_a_port_without_a_route_is_not_steered_by_another_ports_route():
    """Issue 22: HTTP to a Service port no route names went to a port some route listed."""
    other = {
        **route("other", {"backendRefs": [{"name": "catalog", "port": 9090}]}),
    }
    other["spec"]["parentRefs"] = [
        {"group": "", "kind": "Service", "name": "catalog-v2", "namespace": "shop"}
    ]
    p = run(other)
    assert isinstance(p, Plan) and (p.backend.name if p.backend else None, p.port) == (
        "catalog",
        80,
    )


@pytest.mark.parametrize(
    ("redirect", "service_port", "location"),
    [
        (
            {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}},
            8080,
            "http://catalog:8080/new?x=1",
        ),
        (
            {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}},
            80,
            "http://catalog/new?x=1",
        ),
        ({"scheme": "https"}, 8080, "https://catalog/items?x=1"),  # the scheme's own port
        ({"scheme": "https", "port": 8443}, 80, "https://catalog:8443/items?x=1"),
        ({"hostname": "shop.example", "port": 80}, 8080, "http://shop.example/items?x=1"),
    ],
)
def test_a_redirects_location_keeps_the_port_as_gateway_api_says(redirect, service_port, location):
    """Issue 22: a path-only RequestRedirect dropped the port from Location."""
    catalog = svc("shop", "catalog", "10.96.0.5", service_port)
    r = route("old", {"filters": [{"type": "RequestRedirect", "requestRedirect": redirect}]})
    r["spec"]["parentRefs"][0]["port"] = service_port
    state = build_state([*BASE[:2], catalog, r], 1)
    dest = pipeline.destination(state, ME, ("10.96.0.5", service_port))
    assert not isinstance(dest, str), dest
    req = h11.Request(method="GET", target="/items?x=1", headers=[("host", "catalog")])
    out = pipeline.plan(state, ME, dest, CALLER, req, rng=random.Random(1))
    assert isinstance(out, Redirect) and out.location == location


@pytest.mark.parametrize(
    ("spec", "share"),
    [({"percent": 25}, 0.25), ({"fraction": {"numerator": 1, "denominator": 10}}, 0.1), ({}, 1.0)],
)
def test_a_mirror_copies_its_share_of_requests(spec, share):
    """Issue 22: `percent` / `fraction` were ignored: every request was mirrored."""
    r = route(
        "m",
        {
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "catalog-v2", "port": 8080}, **spec},
                }
            ],
            "backendRefs": [{"name": "catalog", "port": 80}],
        },
    )
    state = build_state([*BASE, r], 1)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    req = h11.Request(method="GET", target="/", headers=[("host", "catalog")])
    rng = random.Random(3)
    plans = [pipeline.plan(state, ME, dest, CALLER, req, rng=rng) for _ in range(2000)]
    mirrored = sum(1 for p in plans if isinstance(p, Plan) and p.mirrors) / len(plans)
    assert abs(mirrored - share) < 0.03


def test_a_mirror_with_both_percent_and_fraction_is_refused():
    r = route(
        "m",
        {
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": "catalog-v2", "port": 8080},
                        "percent": 5,
                        "fraction": {"numerator": 1},
                    },
                }
            ]
        },
    )
    state = build_state([*BASE, r], 1)
    assert "exclude each other" in state.invalid[("HTTPRoute", "shop", "m")]


def test_a_request_a_broken_rule_matches_gets_500_and_the_route_says_why():
    r = route(
        "half",
        {"filters": [{"type": "ExtensionRef"}], "backendRefs": [{"name": "catalog", "port": 80}]},
    )
    state = build_state([*BASE, r], 1)
    assert [x.key for x in state.routes] == ["shop/half"]  # in force: it still claims the traffic
    assert "answers 500" in state.invalid[("HTTPRoute", "shop", "half")]
    out = run(r)
    assert isinstance(out, Reply) and (out.status, out.route) == (500, "shop/half")
    assert "filters[0].type" in out.why


@pytest.mark.parametrize(("port", "routed"), [(80, True), (9090, False)])
def test_a_parent_ref_section_name_picks_the_service_port(port, routed):
    """Issue 22: `parentRefs[].sectionName` was ignored: a route applied to every port."""
    two_ports = {
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": "catalog"},
        "spec": {
            "clusterIP": "10.96.0.5",
            "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9090}],
            "selector": {"app": "catalog"},
        },
    }
    r = route("to-v2", {"backendRefs": [{"name": "catalog-v2", "port": 8080}]})
    r["spec"]["parentRefs"][0]["sectionName"] = "http"
    state = build_state([*BASE[:2], two_ports, BASE[3], r], 1)
    dest = pipeline.destination(state, ME, ("10.96.0.5", port))
    assert not isinstance(dest, str), dest
    req = h11.Request(method="GET", target="/", headers=[("host", "catalog")])
    p = pipeline.plan(state, ME, dest, CALLER, req, rng=random.Random(1))
    assert isinstance(p, Plan)
    assert (p.route == "shop/to-v2") is routed
    assert (p.backend.name if p.backend else None) == ("catalog-v2" if routed else "catalog")


def test_a_backend_refs_own_filters_apply_when_it_is_picked():
    """Issue 22: filters on a backendRef were ignored."""
    r = route(
        "split",
        {
            "backendRefs": [
                {
                    "name": "catalog-v2",
                    "port": 8080,
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "x-version", "value": "v2"}]
                            },
                        },
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {
                                "add": [{"name": "x-served-by", "value": "v2"}]
                            },
                        },
                    ],
                }
            ]
        },
    )
    p = run(r)
    assert isinstance(p, Plan)
    assert ("x-version", "v2") in p.headers
    assert [m.apply([]) for m in p.response_headers] == [[("x-served-by", "v2")]]
    bad = route(
        "bad",
        {
            "backendRefs": [
                {"name": "catalog-v2", "port": 8080, "filters": [{"type": "RequestMirror"}]}
            ]
        },
    )
    out = run(bad)
    assert isinstance(out, Reply) and out.status == 500 and "backendRefs[0].filters[0]" in out.why


# -- WebSocket upgrades (issue 22.2) ----------------------------------------------------------

WS = [("connection", "keep-alive, Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]


@pytest.mark.parametrize(
    ("headers", "websocket"),
    [
        (WS, True),
        ([("connection", "Upgrade"), ("upgrade", "WebSocket")], True),  # tokens: any case
        ([("upgrade", "websocket")], False),  # no Connection: upgrade
        ([("connection", "upgrade"), ("upgrade", "h2c")], False),  # other protocols: not passed
    ],
)
def test_a_websocket_upgrade_is_passed_on_with_its_hop_by_hop_headers(headers, websocket):
    p = run(headers=headers)
    assert isinstance(p, Plan) and p.websocket is websocket
    names = {n.lower(): v for n, v in p.headers}
    assert ("upgrade" in names) is websocket and ("connection" in names) is websocket
    if websocket:
        assert names["upgrade"] == "websocket" and names["connection"] == "Upgrade"


def test_a_websocket_upgrade_is_judged_like_any_request():
    deny = service_policy("no-ws", "DENY", {"paths": ["/ws"]})
    p = run(deny, wire="GET /ws HTTP/1.1", headers=WS)
    assert isinstance(p, Reply) and p.status == 403


def test_http2_requests_are_never_upgrades():
    state = build_state(BASE, 1, fetch_jwks)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    req = h11.Request(method="GET", target="/", headers=[("host", "c"), *WS], http_version="2.0")
    p = pipeline.plan(state, ME, dest, CALLER, req, rng=random.Random(7))
    assert isinstance(p, Plan) and not p.websocket


def port_svc(app_protocol: str | None, name: str = "web") -> dict[str, Any]:
    s = svc("shop", "catalog", "10.96.0.5")
    port: dict[str, Any] = {"port": 80, "name": name}
    if app_protocol is not None:
        port["appProtocol"] = app_protocol
    s["spec"]["ports"] = [port]
    return s


@pytest.mark.parametrize(
    ("service", "headers", "http2"),
    [
        (port_svc(None), [], False),
        (port_svc("http"), [], False),
        (port_svc("kubernetes.io/h2c"), [], True),
        (port_svc("grpc"), [], True),
        (port_svc(None, "grpc"), [], True),
        (port_svc(None, "http2-api"), [], True),
        (port_svc("http", "grpc"), [], False),  # appProtocol is what counts when it is given
        (port_svc(None), [("content-type", "application/grpc+proto")], True),  # gRPC: always h2
        (port_svc("kubernetes.io/h2c"), WS, False),  # a WebSocket upgrade is HTTP/1.1's
    ],
)
def test_which_requests_go_to_backends_as_http2(service, headers, http2):
    state = build_state([*BASE[:2], service], 1, fetch_jwks)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    req = h11.Request(method="GET", target="/", headers=[("host", "c"), *headers])
    p = pipeline.plan(state, ME, dest, CALLER, req, rng=random.Random(7))
    assert isinstance(p, Plan) and p.http2 is http2


def test_a_grpc_routes_calls_go_as_http2_to_its_backend():
    grpc = {
        **route("g", {"backendRefs": [{"name": "catalog-v2", "port": 8080}]}),
        "kind": "GRPCRoute",
    }
    p = run(grpc, wire="POST /pkg.Echo/Say HTTP/1.1")
    assert isinstance(p, Plan) and p.http2 and p.route == "shop/g" and p.port == 8080
    missing = {**route("g", {"backendRefs": [{"name": "gone", "port": 1}]}), "kind": "GRPCRoute"}
    r = run(missing, wire="POST /pkg.Echo/Say HTTP/1.1")
    assert isinstance(r, Reply) and r.status == 500 and r.why.startswith("GRPCRoute shop/g:")


def ingress_state(ns_labels: dict[str, str]) -> Any:
    catalog_pod = {
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "catalog-0", "labels": {"app": "catalog"}},
        "spec": {"nodeName": "node2", "serviceAccountName": "catalog"},
        "status": {"phase": "Running", "podIP": "10.244.2.7"},
    }
    ns = {"kind": "Namespace", "metadata": {"name": "shop", "labels": ns_labels}}
    return build_state([ns, *BASE[1:], catalog_pod], 1, fetch_jwks)


SHOP = {"veil.dev/use-waypoint": "waypoint", "veil.dev/dataplane-mode": "ambient"}


@pytest.mark.parametrize(
    ("labels", "peer", "refused"),
    [
        ({**SHOP, "veil.dev/ingress-use-waypoint": "true"}, "catalog", None),
        ({**SHOP, "veil.dev/ingress-use-waypoint": "true"}, "frontend", "only the agent of"),
        (SHOP, "catalog", "takes no ingress through its waypoint"),
    ],
)
def test_only_the_pods_own_agent_may_say_it_carries_plaintext_ingress(labels, peer, refused):
    """A mesh client claiming to be plaintext would walk around DENYs on its principal: the
    claim is believed of the destination pod's identity only (its agent alone holds it)."""
    state = ingress_state(labels)
    dest = pipeline.destination(state, ME, ("10.244.2.7", 9080))
    assert not isinstance(dest, str), dest
    why = pipeline.plaintext_ingress(state, ME, dest, SpiffeId("cluster.local", "shop", peer))
    assert why is None if refused is None else refused in (why or ""), why
    to_service = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(to_service, str)
    assert pipeline.plaintext_ingress(state, ME, to_service, FRONTEND) is not None


def test_plaintext_ingress_is_judged_without_a_principal():
    deny = {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "shop", "name": "no-plaintext"},
        "spec": {
            "targetRefs": [
                {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
            ],
            "action": "DENY",
            "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}],
        },
    }
    state = build_state([*BASE, deny], 1, fetch_jwks)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    req = h11.Request(method="GET", target="/", headers=[("host", "catalog")])
    for caller, status in ((CALLER, None), (Caller(FRONTEND, "10.0.0.1", plaintext=True), 403)):
        out = pipeline.plan(state, ME, dest, caller, req, rng=random.Random(1))
        assert (out.status if isinstance(out, Reply) else None) == status, out
