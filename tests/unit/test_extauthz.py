"""CUSTOM authorization (ext_authz over HTTP): the mesh config's providers, the check the
waypoint sends, what the provider's answer means, and where CUSTOM sits in the pipeline
(before DENY and ALLOW; a provider that is missing or cannot be asked denies)."""

from __future__ import annotations

import random
from typing import Any

import h11
import pytest
import yaml

from tests.support.hbone import FRONTEND
from veil.core import extauthz
from veil.core.authz import parse_policy
from veil.core.extauthz import Allowed, Denied, ProviderError, parse_mesh_config
from veil.core.state import build_state
from veil.runtime.sources.jwks import fetch_jwks
from veil.waypoint import pipeline
from veil.waypoint.pipeline import Caller, Check, Plan, Reply

# Istio's "External Authorization" task, its mesh config pasted unchanged
ISTIO_TASK = {
    "extensionProviders": [
        {
            "name": "sample-ext-authz-http",
            "envoyExtAuthzHttp": {
                "service": "ext-authz.foo.svc.cluster.local",
                "port": "8000",
                "includeRequestHeadersInCheck": ["x-ext-authz"],
            },
        },
        {"name": "otel", "opentelemetry": {"service": "otel.svc", "port": 4317}},
    ]
}


def mesh_config(doc: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"namespace": "veil-system", "name": "veil-mesh"},
        "data": {"mesh": yaml.safe_dump(doc)},
    }


def test_istios_extension_providers_paste_in():
    config = parse_mesh_config(mesh_config(ISTIO_TASK))
    p = config.providers["sample-ext-authz-http"]
    assert (p.namespace, p.service, p.port, p.fail_open, p.status_on_error) == (
        "foo",
        "ext-authz",
        8000,
        False,
        403,
    )
    assert "otel" in config.unusable and "envoyExtAuthzHttp" in config.unusable["otel"]


@pytest.mark.parametrize(
    ("provider", "words"),
    [
        (
            {"service": "ext-authz.foo", "port": 8000, "includeRequestBodyInCheck": {}},
            "not supported",
        ),
        ({"service": "ext-authz", "port": 8000}, "is not <name>.<namespace>"),
        ({"service": "ext-authz.foo"}, "a port number is required"),
        ({"service": "a.b", "port": 1, "pathPrefix": "check"}, "must start with /"),
        ({"service": "a.b", "port": 1, "statusOnError": "teapot"}, "an HTTP status"),
        ({"service": "a.b", "port": 1, "timeout": "soon"}, "timeout"),
        ({"service": "a.b", "port": 1, "failOpen": "yes"}, "true or false"),
    ],
)
def test_a_provider_veil_cannot_honour_fully_is_unusable_and_says_why(provider, words):
    doc = {"extensionProviders": [{"name": "p", "envoyExtAuthzHttp": provider}]}
    config = parse_mesh_config(mesh_config(doc))
    assert "p" not in config.providers and words in config.unusable["p"]


def test_an_unreadable_mesh_config_is_reported_and_defines_no_provider():
    bad = {**mesh_config({}), "data": {"mesh": "extensionProviders: [unclosed"}}
    with pytest.raises(ProviderError, match="not YAML"):
        parse_mesh_config(bad)
    state = build_state([bad], 1)
    assert not state.mesh_config.providers
    assert "not YAML" in state.invalid[extauthz.MESH_CONFIG]


def test_only_the_root_namespaces_veil_mesh_is_the_mesh_config():
    elsewhere = mesh_config(ISTIO_TASK)
    elsewhere["metadata"]["namespace"] = "attacker"
    assert not build_state([elsewhere], 1).mesh_config.providers
    assert build_state([mesh_config(ISTIO_TASK)], 1).mesh_config.providers


def test_the_check_carries_only_the_headers_envoy_would():
    p = parse_mesh_config(mesh_config(ISTIO_TASK)).providers["sample-ext-authz-http"]
    sent = extauthz.check_request(
        p,
        "POST",
        "/headers?x=1",
        [
            ("Host", "echo"),
            ("x-ext-authz", "allow"),
            ("cookie", "secret"),
            ("authorization", "Bearer t"),
            ("content-length", "12"),
        ],
    )
    assert (sent.method, sent.target) == ("POST", "/headers?x=1")
    assert sent.headers == [
        ("host", "echo"),
        ("x-ext-authz", "allow"),
        ("authorization", "Bearer t"),
        ("content-length", "0"),  # the body is not sent
    ]


def provider(**fields: Any) -> extauthz.ExtAuthzProvider:
    doc = {
        "extensionProviders": [
            {"name": "p", "envoyExtAuthzHttp": {"service": "a.b", "port": 1, **fields}}
        ]
    }
    return parse_mesh_config(mesh_config(doc)).providers["p"]


def test_what_an_answer_means():
    p = provider(
        headersToUpstreamOnAllow=["x-user", "x-auth-*"],
        headersToDownstreamOnAllow=["*-trace"],
    )
    answer = [("X-User", "alice"), ("x-auth-level", "2"), ("x-other", "no"), ("b-trace", "t")]
    allowed = extauthz.verdict(p, 200, answer, b"")
    assert allowed == Allowed((("x-user", "alice"), ("x-auth-level", "2")), (("b-trace", "t"),))
    denied = extauthz.verdict(p, 401, [*answer, ("host", "x"), ("content-length", "3")], b"no!")
    assert isinstance(denied, Denied) and denied.status == 401 and denied.body == b"no!"
    assert ("x-other", "no") in denied.headers  # all of them, as Envoy, but Host
    assert not {"host", "content-length"} & {n for n, _ in denied.headers}
    only = extauthz.verdict(provider(headersToDownstreamOnDeny=["x-user"]), 403, answer, b"")
    assert isinstance(only, Denied) and only.headers == (("x-user", "alice"),)
    assert extauthz.upstream_request([("x-user", "mallory"), ("a", "b")], [allowed]) == [
        ("a", "b"),
        ("x-user", "alice"),
        ("x-auth-level", "2"),
    ]


def test_a_provider_that_cannot_be_asked_denies_unless_it_fails_open():
    closed = extauthz.unreachable(provider(), "refused")
    assert isinstance(closed, Denied) and closed.status == 403 and "refused" in closed.why
    assert extauthz.unreachable(provider(statusOnError="503"), "x").status == 503  # type: ignore[union-attr]
    assert extauthz.unreachable(provider(failOpen=True), "x") == Allowed((), ())


# -- in the pipeline -----------------------------------------------------------------------------

ME = pipeline.ThisWaypoint("shop", "waypoint", "cluster.local")
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
    {
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": "catalog"},
        "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}], "selector": {"app": "c"}},
    },
]


def custom(paths: list[str], name: str = "sample-ext-authz-http") -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "shop", "name": "ext"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "catalog"}],
            "action": "CUSTOM",
            "provider": {"name": name},
            "rules": [{"to": [{"operation": {"paths": paths}}]}],
        },
    }


def plan(*objects: Any, path: str = "/headers", approved: Any = None) -> Any:
    state = build_state([*BASE, *objects], 1, fetch_jwks)
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str)
    req = h11.Request(method="GET", target=path, headers=[("host", "catalog")])
    return pipeline.plan(
        state, ME, dest, Caller(FRONTEND, "10.0.0.9"), req, rng=random.Random(1), approved=approved
    )


def test_a_custom_policy_asks_its_provider_only_for_what_its_rules_select():
    check = plan(custom(["/headers"]), mesh_config(ISTIO_TASK))
    assert isinstance(check, Check)
    ((ref, p, request),) = check.checks
    assert (ref, p.name, request.target) == ("shop/ext", "sample-ext-authz-http", "/headers")
    assert isinstance(plan(custom(["/headers"]), mesh_config(ISTIO_TASK), path="/ip"), Plan)


def test_after_the_provider_allowed_deny_and_allow_policies_still_apply():
    deny = {
        **custom([]),
        "metadata": {"namespace": "shop", "name": "deny"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "catalog"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}],
        },
    }
    ok = Allowed((("x-user", "alice"),), (("x-seen", "1"),))
    out = plan(custom(["/headers"]), mesh_config(ISTIO_TASK), deny, approved=(ok,))
    assert isinstance(out, Reply) and out.status == 403 and "shop/deny" in out.why
    sent = plan(custom(["/headers"]), mesh_config(ISTIO_TASK), approved=(ok,))
    assert isinstance(sent, Plan) and ("x-user", "alice") in sent.headers
    assert [m.add for m in sent.response_headers] == [(("x-seen", "1"),)]


@pytest.mark.parametrize("config", [None, mesh_config({"extensionProviders": []})])
def test_a_custom_policy_whose_provider_is_not_defined_denies(config):
    out = plan(custom(["/headers"]), *([config] if config else []))
    assert isinstance(out, Reply) and out.status == 403
    assert "provider sample-ext-authz-http" in out.why and "veil-mesh" in out.why


def test_a_custom_policy_without_target_refs_stands_as_deny_all():
    doc = custom(["/headers"])
    del doc["spec"]["targetRefs"]
    with pytest.raises(ValueError, match="enforced by waypoints"):
        parse_policy(doc)
