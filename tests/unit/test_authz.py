"""AuthorizationPolicy semantics (Istio's documented examples), evaluated purely."""

from __future__ import annotations

from typing import Any

import pytest

from agent.authz import Facts, PolicyError, PolicySet, decide, parse_policy

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
        ({"action": "CUSTOM"}, "spec.action", "CUSTOM is not supported"),
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
