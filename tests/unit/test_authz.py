"""AuthorizationPolicy semantics (Istio's documented examples), evaluated purely."""

from __future__ import annotations

from typing import Any

import pytest

from veil.core.authz import Facts, PolicyError, PolicySet, decide, parse_policy

CLIENT = "cluster.local/ns/mesh/sa/client"
OTHER = "cluster.local/ns/other/sa/default"


def policy(spec: dict[str, Any] | None, name: str = "p", ns: str = "mesh") -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def facts(
    principal: str | None = CLIENT,
    src: str = "10.244.1.10",
    port: int = 8080,
    labels: dict[str, str] | None = None,
    ns: str = "mesh",
) -> Facts:
    return Facts(
        source_ip=src,
        destination_ip="10.244.2.10",
        destination_port=port,
        principal=principal,
        destination_labels=labels or {"app": "server"},
        destination_namespace=ns,
    )


def allowed(specs: list[dict[str, Any]], f: Facts) -> bool:
    return decide([parse_policy(s) for s in specs], f).allowed


ALLOW_CLIENT = policy({"rules": [{"from": [{"source": {"principals": [CLIENT]}}]}]})


@pytest.mark.parametrize(
    ("specs", "f", "expected"),
    [
        ([], facts(), True),  # no policy: allowed
        ([policy({})], facts(), False),  # allow-nothing
        ([policy(None)], facts(), False),  # allow-nothing, spec omitted
        ([policy({"action": "DENY", "rules": [{}]})], facts(), False),  # deny-all
        ([policy({"rules": [{}]})], facts(), True),  # allow-all
        ([ALLOW_CLIENT], facts(), True),  # allow by principal
        ([ALLOW_CLIENT], facts(OTHER), False),
        ([ALLOW_CLIENT], facts(None), False),  # plaintext has no principal
        (
            [
                policy(
                    {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/*"]}}]}]}
                )
            ],
            facts(),
            True,
        ),  # prefix wildcard
        ([policy({"rules": [{"from": [{"source": {"namespaces": ["mesh"]}}]}]})], facts(), True),
        (
            [policy({"rules": [{"from": [{"source": {"namespaces": ["mesh"]}}]}]})],
            facts(OTHER),
            False,
        ),
        (
            [policy({"rules": [{"from": [{"source": {"notNamespaces": ["other"]}}]}]})],
            facts(OTHER),
            False,
        ),
        (
            [policy({"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]})],
            facts(None),
            True,
        ),  # by ipBlock: plaintext too
        (
            [policy({"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]})],
            facts(src="10.244.2.9"),
            False,
        ),
        (
            [
                policy(
                    {"action": "DENY", "rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}
                )
            ],
            facts(port=8080),
            True,
        ),  # notPorts
        (
            [
                policy(
                    {"action": "DENY", "rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}
                )
            ],
            facts(port=9090),
            False,
        ),
        ([policy({"action": "AUDIT", "rules": [{}]})], facts(), True),  # AUDIT changes nothing
        ([policy({"action": "AUDIT", "rules": [{}]}, "a"), policy({}, "b")], facts(), False),
        # DENY wins over ALLOW
        (
            [
                ALLOW_CLIENT,
                policy(
                    {"action": "DENY", "rules": [{"from": [{"source": {"principals": [CLIENT]}}]}]},
                    "deny",
                ),
            ],
            facts(),
            False,
        ),
        # L7 fields: an ALLOW rule never matches on the agent, a DENY rule denies on its L4 part
        ([policy({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})], facts(), False),
        (
            [
                policy(
                    {
                        "action": "DENY",
                        "rules": [
                            {
                                "from": [{"source": {"principals": [CLIENT]}}],
                                "to": [{"operation": {"paths": ["/admin"]}}],
                            }
                        ],
                    }
                )
            ],
            facts(),
            False,
        ),
        # when conditions
        (
            [policy({"rules": [{"when": [{"key": "source.namespace", "values": ["mesh"]}]}]})],
            facts(),
            True,
        ),
        (
            [policy({"rules": [{"when": [{"key": "destination.port", "notValues": ["8080"]}]}]})],
            facts(),
            False,
        ),
        (
            [policy({"rules": [{"when": [{"key": "request.headers[x]", "values": ["1"]}]}]})],
            facts(),
            False,
        ),  # an L7 key in an ALLOW rule
        # scope: selector, other namespace, root namespace
        ([policy({"selector": {"matchLabels": {"app": "web"}}})], facts(), True),
        ([policy({"selector": {"matchLabels": {"app": "server"}}})], facts(), False),
        ([policy({}, ns="other")], facts(), True),
        ([policy({"action": "DENY", "rules": [{}]}, ns="veil-system")], facts(), False),
        ([policy({"targetRefs": [{"kind": "Gateway", "name": "wp"}]})], facts(), True),
    ],
)
def test_semantics(specs, f, expected):
    assert allowed(specs, f) is expected


def test_decision_names_the_policy():
    d = decide([parse_policy(ALLOW_CLIENT)], facts(OTHER))
    assert not d.allowed and d.policy == "mesh/p" and "no rule" in d.reason
    d = decide([parse_policy(policy({"action": "DENY", "rules": [{}]}, "block"))], facts())
    assert (d.allowed, d.policy) == (False, "mesh/block")
    d = decide([parse_policy(policy({"action": "AUDIT", "rules": [{}]}, "watch"))], facts())
    assert d.allowed and d.audited == ("mesh/watch",)


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"rulez": []}, "spec.rulez", "unknown field"),
        ({"action": "CUSTOM"}, "spec.provider.name", "CUSTOM needs the extension provider"),
        (
            {"action": "CUSTOM", "provider": {"name": "authz"}},
            "spec.action",
            "CUSTOM (external authorization) is enforced by waypoints",
        ),
        ({"provider": {"name": "authz"}}, "spec.provider", "only with action CUSTOM"),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks",
            "not an IP address or CIDR",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": "x"}}]}]},
            "spec.rules[0].from[0].source.principals",
            "list of strings",
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports",
            "not a port number",
        ),
        (
            {"rules": [{"when": [{"key": "source.color", "values": ["x"]}]}]},
            "spec.rules[0].when[0].key",
            "unknown condition key",
        ),
        ({"selector": {"matchLabels": {"app": 1}}}, "spec.selector.matchLabels", "map of strings"),
    ],
)
def test_bad_policies_name_the_policy_and_field(spec, path, words):
    with pytest.raises(PolicyError) as e:
        parse_policy(policy(spec, "bad"))
    assert e.value.path == path and words in e.value.message
    assert str(e.value).startswith("AuthorizationPolicy mesh/bad: ")


def test_an_invalid_edit_keeps_the_previous_version_in_force():
    good = policy({"action": "DENY", "rules": [{"from": [{"source": {"principals": [OTHER]}}]}]})
    bad = policy({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["nope"]}}]}]})
    first = PolicySet().update([good])
    second = first.update([bad])
    assert "ipBlocks" in second.errors["mesh/p"]
    assert decide(second.policies.values(), facts(OTHER)).allowed is False  # still denied
    assert decide(second.policies.values(), facts(CLIENT)).allowed is True


def test_a_policy_that_never_validated_denies_its_scope():
    bad = policy({"selector": {"matchLabels": {"app": "server"}}, "rulez": []})
    ps = PolicySet().update([bad])
    assert decide(ps.policies.values(), facts()).allowed is False  # never fails open
    assert decide(ps.policies.values(), facts(labels={"app": "web"})).allowed is True
    assert "unknown field" in decide(ps.policies.values(), facts()).reason


# -- L7, at the waypoint -------------------------------------------------------------------


def l7_policy(spec: str) -> Any:
    import yaml  # noqa: PLC0415

    return parse_policy(
        yaml.safe_load(
            "apiVersion: security.veil.dev/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: l7, namespace: shop}\nspec:\n"
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n"
            + spec
        )
    )


SHOP_CLIENT = "cluster.local/ns/shop/sa/client"


def request(
    method: str = "GET", path: str = "/", principal: str = SHOP_CLIENT, **headers: str
) -> Facts:
    from veil.core.authz import HttpFacts  # noqa: PLC0415

    return Facts(
        "10.244.1.10",
        "10.96.0.10",
        9080,
        principal=principal,
        destination_namespace="shop",
        http=HttpFacts(
            method, path, "catalog", {k.replace("_", "-"): v for k, v in headers.items()}
        ),
    )


def test_l7_rules_are_enforced_at_the_waypoint_only():
    from veil.core.authz import at_waypoint  # noqa: PLC0415

    p = l7_policy(
        "  rules:\n"
        "    - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]\n"
        "      to: [{operation: {methods: [GET], paths: ['/items*']}}]\n"
        "      when: [{key: 'request.headers[x-team]', values: [blue]}]\n"
    )
    scope = at_waypoint("shop", "waypoint", ("catalog",))
    assert decide([p], request(path="/items/1", x_team="blue"), scope).allowed
    assert not decide([p], request(path="/admin", x_team="blue"), scope).allowed
    assert not decide([p], request("POST", "/items", x_team="blue"), scope).allowed
    assert not decide([p], request(path="/items", x_team="red"), scope).allowed
    other = "cluster.local/ns/shop/sa/frontend"
    assert not decide([p], request(path="/items", principal=other, x_team="blue"), scope).allowed
    # other waypoints and other services' requests are not in its scope; the agent ignores it
    assert decide([p], request(path="/admin"), at_waypoint("shop", "other", ("cart",))).allowed
    assert decide([p], facts()).allowed


def test_a_shared_waypoint_enforces_the_service_namespaces_policies():
    """A waypoint in `infra` serving Service store/inventory (use-waypoint-namespace): the
    policies of store that target inventory apply, so do infra's on the Gateway; a policy of
    infra naming a Service `inventory` does not (it names infra/inventory)."""
    import yaml  # noqa: PLC0415

    from veil.core.authz import at_waypoint  # noqa: PLC0415

    def policy(ns: str, kind: str, name: str, path: str) -> Any:
        return parse_policy(
            yaml.safe_load(
                f"apiVersion: security.veil.dev/v1\nkind: AuthorizationPolicy\n"
                f"metadata: {{name: p-{ns}-{kind}, namespace: {ns}}}\n"
                f"spec: {{targetRefs: [{{kind: {kind}, name: {name}}}], action: DENY,"
                f" rules: [{{to: [{{operation: {{paths: ['{path}']}}}}]}}]}}\n"
            )
        )

    store = policy("store", "Service", "inventory", "/store-deny")
    gateway = policy("infra", "Gateway", "shared", "/gateway-deny")
    stray = policy("infra", "Service", "inventory", "/stray")
    scope = at_waypoint("infra", "shared", ("inventory",), "store")
    ps = [store, gateway, stray]
    assert not decide(ps, request(path="/store-deny"), scope).allowed
    assert not decide(ps, request(path="/gateway-deny"), scope).allowed
    assert decide(ps, request(path="/stray"), scope).allowed


def test_a_deny_on_l7_fields_and_a_never_valid_waypoint_policy():
    from veil.core.authz import PolicySet, at_waypoint  # noqa: PLC0415

    deny = l7_policy(
        "  action: DENY\n  rules: [{to: [{operation: {paths: ['/admin*'], notMethods: [GET]}}]}]\n"
    )
    scope = at_waypoint("shop", "waypoint", ("catalog",))
    assert not decide([deny], request("POST", "/admin/x"), scope).allowed
    assert decide([deny], request("GET", "/admin/x"), scope).allowed
    broken = {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "catalog"}], "action": "NOPE"},
    }
    ps = PolicySet().update([broken])
    assert not decide(ps.policies.values(), request(), scope).allowed  # fails closed there
    assert decide(ps.policies.values(), facts()).allowed  # and is not the agent's


@pytest.mark.parametrize(
    ("accounts", "client", "expected"),
    [
        (["client"], "cluster.local/ns/mesh/sa/client", True),  # the policy's namespace
        (["mesh/client"], "other.td/ns/mesh/sa/client", True),  # any trust domain
        (["client"], "cluster.local/ns/other/sa/client", False),
        (["other/client"], "cluster.local/ns/other/sa/client", True),
        (["mesh/client"], None, False),  # plaintext has no service account
    ],
)
def test_source_service_accounts(accounts, client, expected):
    """Issue 17.17: `source.serviceAccounts` used to turn the policy into deny-all."""
    spec = {"rules": [{"from": [{"source": {"serviceAccounts": accounts}}]}]}
    p = parse_policy(policy(spec))
    assert decide([p], facts(principal=client)).allowed is expected
    deny = parse_policy(policy({**spec, "action": "DENY"}))
    assert decide([deny], facts(principal=client)).allowed is not expected


@pytest.mark.parametrize(
    "obj",
    [
        # found by tests/fuzz (policies): these shapes raised TypeError/AttributeError out of
        # the parser, and a raise there stops the state's writer (every agent and waypoint)
        {"spec": {"targetRefs": 5}},
        {"spec": {"rules": [{"from": 5}]}},
        {"spec": {"rules": [{"when": [{"key": "source.ip", "values": 5}]}]}},
        {"metadata": "x", "spec": 5},
    ],
)
def test_odd_shapes_are_invalid_policies_that_deny_never_crashes(obj):
    doc = {"apiVersion": "security.veil.dev/v1", "kind": "AuthorizationPolicy", **obj}
    doc.setdefault("metadata", {"namespace": "mesh", "name": "odd"})
    with pytest.raises(PolicyError):
        parse_policy(doc)
    policies = PolicySet().update([doc])
    (p,) = policies.policies.values()
    assert p.invalid and p.action == "DENY" and policies.errors


@pytest.mark.parametrize(
    ("paths", "path", "allowed_"),
    [
        (["/api/{*}/items"], "/api/42/items", True),
        (["/api/{*}/items"], "/api/a/b/items", False),  # {*}: exactly one segment
        (["/api/{*}/items"], "/api//items", False),  # ... and never an empty one
        (["/files/{**}"], "/files/a/b/c.txt", True),  # {**}: any run of segments
        (["/files/{**}"], "/files/", True),
        (["/files/{**}"], "/filesystem", False),
        (["/files/{**}"], "/other/files/x", False),
        (["/items*"], "/items/1", True),  # no template: Istio's glob, as before
    ],
)
def test_istio_path_templates(paths, path, allowed_):
    """Issue 22: Istio's `{*}` / `{**}` path templates (Envoy's URI template semantics)."""
    from veil.core.authz import at_waypoint  # noqa: PLC0415

    p = l7_policy(f"  rules:\n    - to: [{{operation: {{paths: {paths!r}}}}}]\n")
    scope = at_waypoint("shop", "waypoint", ("catalog",))
    assert decide([p], request(path=path), scope).allowed is allowed_


@pytest.mark.parametrize("template", ["/a/{**}/{*}", "/a/{id}", "a/{*}", "/a/{*"])
def test_a_path_template_envoy_would_refuse_is_refused(template):
    with pytest.raises(PolicyError, match=r"spec.rules\[0\].to\[0\].operation.paths"):
        l7_policy(f"  rules:\n    - to: [{{operation: {{paths: [{template!r}]}}}}]\n")


# -- remoteIpBlocks / remote.ip: only where the original client address is known (22.3) -------


def remote(ip: str, principal: str = SHOP_CLIENT) -> Facts:
    from veil.core.authz import HttpFacts  # noqa: PLC0415

    # the direct peer (source_ip) is another address: a waypoint sees the tunnel's peer
    return Facts(
        "10.244.9.9",
        "10.96.0.10",
        9080,
        principal=principal,
        destination_namespace="shop",
        http=HttpFacts("GET", "/", "catalog", {}, remote_ip=ip),
    )


@pytest.mark.parametrize("field", ["from", "when"])
def test_remote_ip_is_the_original_clients_at_the_waypoint_and_unknown_at_an_agent(field):
    from veil.core.authz import at_waypoint  # noqa: PLC0415

    block = (
        "    - from: [{source: {remoteIpBlocks: [10.244.1.0/24]}}]\n"
        if field == "from"
        else "    - when: [{key: remote.ip, values: [10.244.1.0/24]}]\n"
    )
    allow = l7_policy("  rules:\n" + block)
    deny = l7_policy("  action: DENY\n  rules:\n" + block)
    scope = at_waypoint("shop", "waypoint", ("catalog",))
    assert decide([allow], remote("10.244.1.5"), scope).allowed
    assert not decide([allow], remote("10.244.2.5"), scope).allowed
    assert not decide([allow], remote(""), scope).allowed  # unknown: ALLOW cannot match
    assert not decide([deny], remote("10.244.1.5"), scope).allowed
    assert decide([deny], remote("10.244.2.5"), scope).allowed
    assert not decide([deny], remote(""), scope).allowed  # unknown: DENY applies without it
    # on an agent (a workload policy, no HTTP facts): an L7 field, as in Istio's conversion
    agent_allow = parse_policy(
        policy({"rules": [{"from": [{"source": {"remoteIpBlocks": ["10.244.1.0/24"]}}]}]})
    )
    assert not decide([agent_allow], facts(src="10.244.1.10")).allowed
    agent_deny = parse_policy(
        policy(
            {
                "action": "DENY",
                "rules": [{"from": [{"source": {"remoteIpBlocks": ["10.9.0.0/16"]}}]}],
            }
        )
    )
    assert not decide([agent_deny], facts(src="10.244.1.10")).allowed  # broader: denies


def test_not_remote_ip_blocks_with_an_unknown_address_fails_closed():
    from veil.core.authz import at_waypoint  # noqa: PLC0415

    scope = at_waypoint("shop", "waypoint", ("catalog",))
    allow = l7_policy("  rules:\n    - from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}]\n")
    assert decide([allow], remote("192.168.1.1"), scope).allowed
    assert not decide([allow], remote("10.1.1.1"), scope).allowed
    assert not decide([allow], remote(""), scope).allowed
    deny = l7_policy(
        "  action: DENY\n  rules:\n    - from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}]\n"
    )
    assert not decide([deny], remote(""), scope).allowed
    assert decide([deny], remote("10.1.1.1"), scope).allowed


# -- connection.sni: a TLS stream's server name, read by the waypoint (22.3) -------------------


def test_connection_sni_is_judged_by_the_waypoint_on_tls_streams():
    from dataclasses import replace  # noqa: PLC0415

    from veil.core.authz import at_waypoint  # noqa: PLC0415

    scope = at_waypoint("shop", "waypoint", ("catalog",))
    when = "    - when: [{key: connection.sni, values: ['*.example.com']}]\n"
    allow = l7_policy("  rules:\n" + when)
    tcp = replace(remote("10.244.1.5"), http=None, waypoint=True)
    assert decide([allow], replace(tcp, sni="api.example.com"), scope).allowed
    assert not decide([allow], replace(tcp, sni="api.other.org"), scope).allowed
    assert not decide([allow], tcp, scope).allowed  # no TLS, no name
    deny = l7_policy("  action: DENY\n  rules:\n" + when)
    assert not decide([deny], replace(tcp, sni="api.example.com"), scope).allowed
    assert decide([deny], tcp, scope).allowed
    # an agent reads no stream: an ALLOW cannot match, a DENY applies without it
    agent_allow = parse_policy(
        policy({"rules": [{"when": [{"key": "connection.sni", "values": ["a.example"]}]}]})
    )
    assert not decide([agent_allow], facts()).allowed
    agent_deny = parse_policy(
        policy(
            {"action": "DENY", "rules": [{"when": [{"key": "connection.sni", "values": ["x"]}]}]}
        )
    )
    assert not decide([agent_deny], facts()).allowed
