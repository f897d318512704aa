"""HTTPRoute matching, precedence and weighted choice (pure)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from veil.core.routes import (
    Redirect,
    RequestFacts,
    Rewrite,
    RouteError,
    parse_grpc_route,
    parse_route,
    parse_tcp_route,
    pick_backend,
    replace_path,
    select,
)


def route(name: str, rules: list[dict[str, Any]], created: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "catalog", "port": 9080}],
            "rules": rules,
        },
    }


def backend(name: str, weight: int = 1) -> dict[str, Any]:
    return {"name": name, "port": 9080, "weight": weight}


ROUTE = parse_route(
    route(
        "catalog",
        [
            {
                "matches": [{"path": {"type": "Exact", "value": "/items"}}],
                "backendRefs": [backend("exact")],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/items"}}],
                "backendRefs": [backend("prefix")],
            },
            {
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/"},
                        "headers": [{"name": "X-Canary", "value": "yes"}],
                    }
                ],
                "backendRefs": [backend("canary")],
            },
            {"matches": [{"method": "POST"}], "backendRefs": [backend("writes")]},
            {
                "matches": [
                    {"queryParams": [{"name": "v", "type": "RegularExpression", "value": "2|two"}]}
                ],
                "backendRefs": [backend("query")],
            },
            {
                "matches": [{"path": {"type": "RegularExpression", "value": "/api/v[0-9]+/.*"}}],
                "backendRefs": [backend("regex")],
            },
            {"backendRefs": [backend("default")]},
        ],
    )
)


@pytest.mark.parametrize(
    ("method", "target", "headers", "want"),
    [
        ("GET", "/items", {}, "exact"),
        ("GET", "/items/7", {}, "prefix"),
        ("GET", "/itemsx", {}, "default"),  # a prefix matches whole path segments only
        ("GET", "/", {"x-canary": "yes"}, "canary"),
        ("GET", "/items", {"X-Canary": "yes"}, "exact"),  # Exact path beats headers
        ("POST", "/", {}, "writes"),
        ("GET", "/?v=two", {}, "query"),
        ("GET", "/?v=3", {}, "default"),
        ("GET", "/api/v1/x", {}, "regex"),
        ("GET", "/other", {}, "default"),
    ],
)
def test_gateway_api_precedence(method, target, headers, want):
    hit = select([ROUTE], RequestFacts.of(method, target, headers.items()))
    assert hit is not None
    assert hit.rule.backends[0].name == want


def test_no_match_without_a_catch_all():
    r = parse_route(
        route(
            "x",
            [
                {
                    "matches": [{"path": {"type": "Exact", "value": "/a"}}],
                    "backendRefs": [backend("a")],
                }
            ],
        )
    )
    assert select([r], RequestFacts.of("GET", "/b", [])) is None


def test_older_route_wins_a_tie():
    older = parse_route(route("b", [{"backendRefs": [backend("older")]}], "2026-01-01T00:00:00Z"))
    newer = parse_route(route("a", [{"backendRefs": [backend("newer")]}], "2026-02-01T00:00:00Z"))
    hit = select([newer, older], RequestFacts.of("GET", "/", []))
    assert hit is not None and hit.rule.backends[0].name == "older"


def test_a_90_10_split_lands_within_a_few_percent():
    r = parse_route(route("split", [{"backendRefs": [backend("v1", 90), backend("v2", 10)]}]))
    rng = random.Random(7)
    got = Counter(b.name for _ in range(2000) if (b := pick_backend(r.rules[0], rng)))
    assert abs(got["v2"] / 2000 - 0.10) < 0.03
    zero = parse_route(route("z", [{"backendRefs": [backend("v1", 0)]}]))
    assert pick_backend(zero.rules[0]) is None


def test_header_modifiers_set_add_remove():
    r = parse_route(
        route(
            "m",
            [
                {
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "X-Env", "value": "canary"}],
                                "add": [{"name": "X-Seen", "value": "waypoint"}],
                                "remove": ["X-Drop"],
                            },
                        }
                    ],
                    "backendRefs": [backend("a")],
                }
            ],
        )
    )
    mod = r.rules[0].request_headers
    assert mod is not None
    out = mod.apply([("x-env", "prod"), ("X-Drop", "1"), ("Accept", "*/*")])
    assert out == [("Accept", "*/*"), ("X-Env", "canary"), ("X-Seen", "waypoint")]


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        (
            [{"matches": [{"path": {"type": "Glob", "value": "/a"}}]}],
            "rules[0].matches[0].path.type",
        ),
        (
            [{"matches": [{"path": {"type": "PathPrefix", "value": "a"}}]}],
            "rules[0].matches[0].path.value",
        ),
        (
            [{"matches": [{"path": {"type": "RegularExpression", "value": "("}}]}],
            "rules[0].matches[0].path.value",
        ),
    ],
)
def test_invalid_routes_name_the_field(rules, field):
    with pytest.raises(
        RouteError, match=f"HTTPRoute shop/bad: spec.{field.replace('[', '.').replace(']', '.')}"
    ):
        parse_route(route("bad", rules))


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"backendRefs": [{"name": "a"}]}, "rules[1].backendRefs[0].port"),
        ({"filters": [{"type": "ExtensionRef"}]}, "rules[1].filters[0].type"),
        ({"retry": {"codes": [200]}}, "rules[1].retry.codes"),
    ],
)
def test_a_rule_that_cannot_be_applied_is_kept_to_answer_500(rule, field):
    """Issue 22: one unsupported filter or retry code dropped the whole route, and its
    traffic went straight to the Service. Gateway API: the affected rule answers 500."""
    good = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/ok"}}],
        "backendRefs": [backend("a")],
    }
    r = parse_route(route("bad", [good, rule]))
    assert r.rules[0].invalid is None
    assert (r.rules[1].invalid or "").startswith(
        f"HTTPRoute shop/bad: spec.{field}".replace("[", "[").replace("]", "]")
    )
    assert r.problems == (r.rules[1].invalid,)


def test_filters_timeouts_and_retry_parse():
    r = parse_route(
        route(
            "f",
            [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                    "filters": [
                        {
                            "type": "RequestRedirect",
                            "requestRedirect": {
                                "hostname": "new.example",
                                "path": {
                                    "type": "ReplacePrefixMatch",
                                    "replacePrefixMatch": "/new",
                                },
                                "statusCode": 301,
                            },
                        }
                    ],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1/"}}],
                    "filters": [
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "hostname": "catalog.internal",
                                "path": {
                                    "type": "ReplacePrefixMatch",
                                    "replacePrefixMatch": "/api/",
                                },
                            },
                        },
                        {
                            "type": "RequestMirror",
                            "requestMirror": {"backendRef": backend("shadow")},
                        },
                    ],
                    "backendRefs": [backend("a")],
                    "timeouts": {"request": "2s", "backendRequest": "500ms"},
                    "retry": {"attempts": 3, "backoff": "10ms", "codes": [503]},
                },
            ],
        )
    )
    redirect, rewrite = r.rules[0], r.rules[1]
    assert redirect.redirect == Redirect(
        None, "new.example", None, ("ReplacePrefixMatch", "/new"), 301
    )
    assert rewrite.rewrite == Rewrite("catalog.internal", ("ReplacePrefixMatch", "/api/"))
    assert [m.backend.name for m in rewrite.mirrors] == ["shadow"]
    assert (rewrite.timeout, rewrite.backend_timeout) == (2.0, 0.5)
    assert rewrite.retry is not None and rewrite.retry.attempts == 3
    hit = select([r], RequestFacts.of("GET", "/v1/items/7", []))
    assert hit is not None and hit.rule is rewrite
    assert replace_path("/v1/items/7", ("ReplacePrefixMatch", "/api/"), hit.match) == "/api/items/7"
    old = select([r], RequestFacts.of("GET", "/old/x", []))
    assert old is not None
    assert replace_path("/old/x", ("ReplacePrefixMatch", "/new"), old.match) == "/new/x"
    assert replace_path("/old/x", ("ReplaceFullPath", "/"), old.match) == "/"


# -- GRPCRoute ----------------------------------------------------------------------------------


def grpc_route(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {**route("g", rules), "kind": "GRPCRoute"}


def call(path: str, **headers: str) -> RequestFacts:
    hdrs = [("content-type", "application/grpc"), *headers.items()]
    return RequestFacts.of("POST", path, hdrs)


@pytest.mark.parametrize(
    ("method", "hits", "misses"),
    [
        (
            {"service": "pkg.Echo", "method": "Say"},
            ["/pkg.Echo/Say"],
            ["/pkg.Echo/SayMore", "/x/Say"],
        ),
        ({"service": "pkg.Echo"}, ["/pkg.Echo/Say", "/pkg.Echo/Other"], ["/pkg.EchoTwo/Say"]),
        ({"method": "Say"}, ["/pkg.Echo/Say", "/other.Svc/Say"], ["/pkg.Echo/Sayer", "/Say"]),
        (
            {"type": "RegularExpression", "service": r"pkg\..*", "method": "S.*"},
            ["/pkg.Echo/Say", "/pkg.X/Stop"],
            ["/other.Echo/Say", "/pkg.Echo/Go"],
        ),
        (
            {"type": "RegularExpression", "method": "Get.*"},
            ["/a.B/GetX"],
            ["/a.B/Put", "/a/b/GetX"],
        ),
    ],
)
def test_a_grpc_method_match_is_the_path_of_the_call(method, hits, misses):
    r = parse_grpc_route(grpc_route([{"matches": [{"method": method}], "backendRefs": []}]))
    assert r.kind == "GRPCRoute"
    for path in hits:
        assert select([r], call(path)) is not None, path
    for path in misses:
        assert select([r], call(path)) is None, path


def test_grpc_metadata_matches_are_headers_and_the_most_specific_rule_wins():
    r = parse_grpc_route(
        grpc_route(
            [
                {"matches": [{"headers": [{"name": "version", "value": "two"}]}]},
                {
                    "matches": [
                        {
                            "headers": [
                                {"name": "version", "value": "two"},
                                {"name": "color", "value": "orange"},
                            ]
                        }
                    ]
                },
            ]
        )
    )
    assert select([r], call("/a.B/C", version="two")).rule is r.rules[0]  # type: ignore[union-attr]
    both = select([r], call("/a.B/C", version="two", color="orange"))
    assert both is not None and both.rule is r.rules[1]


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}, "'URLRewrite' is not supported"),
        ({"filters": [{"type": "RequestRedirect"}]}, "'RequestRedirect' is not supported"),
    ],
)
def test_filters_grpc_routes_do_not_have_make_the_rule_answer_500(rule, why):
    r = parse_grpc_route(grpc_route([rule]))
    assert r.rules[0].invalid is not None and why in r.rules[0].invalid
    assert r.rules[0].invalid.startswith("GRPCRoute shop/g: spec.rules[0]")


@pytest.mark.parametrize(
    "method",
    [
        {},
        {"service": "a/b", "method": "C"},
        {"type": "Prefix", "service": "a"},
        "pkg.Echo/Say",
    ],
)
def test_a_grpc_method_match_that_means_nothing_is_refused(method):
    with pytest.raises(RouteError, match=r"GRPCRoute shop/g: spec.rules\[0\].matches\[0\].method"):
        parse_grpc_route(grpc_route([{"matches": [{"method": method}]}]))


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("GRPCRoute", {"rules": ["not a rule"]}),  # found by the `policies` fuzz harness
        ("TCPRoute", {"rules": ["not a rule"]}),
        ("GRPCRoute", {"rules": [{"matches": ["not a match"]}]}),
        ("GRPCRoute", {"rules": [{"matches": [{"method": {"service": "a", "type": 5}}]}]}),
    ],
)
def test_grpc_and_tcp_routes_of_odd_shapes_are_refused_with_route_errors(kind, spec):
    parse = parse_grpc_route if kind == "GRPCRoute" else parse_tcp_route
    with pytest.raises(RouteError, match=kind):
        parse({**route("g", []), "kind": kind, "spec": spec})
