"""The state's writer types every L7 kind once per change of the object (issue 18, item 1):
consumers read `state.routes`, `state.traffic_policies`, ... and never parse raw objects; a
validation error is attached to its object (`state.invalid`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.jwt import Issuer
from veil.core.state import StateBuilder, object_key
from veil.runtime.sources.jwks import fetch_jwks

ROOT = Path(__file__).parents[2]


def route(name: str, path_type: str = "PathPrefix") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "catalog"}],
            "rules": [
                {
                    "matches": [{"path": {"type": path_type, "value": "/"}}],
                    "backendRefs": [{"name": "catalog", "port": 80}],
                }
            ],
        },
    }


TRAFFIC = {
    "apiVersion": "traffic.veil.dev/v1",
    "kind": "TrafficPolicy",
    "metadata": {"namespace": "shop", "name": "tp"},
    "spec": {
        "targetRefs": [{"group": "", "kind": "Service", "name": "catalog"}],
        "rateLimit": {"requestsPerSecond": 5, "burst": 5},
    },
}
GRANT = {
    "apiVersion": "gateway.networking.k8s.io/v1beta1",
    "kind": "ReferenceGrant",
    "metadata": {"namespace": "backend", "name": "g"},
    "spec": {
        "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
        "to": [{"group": "", "kind": "Service"}],
    },
}
GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"namespace": "shop", "name": "waypoint"},
    "spec": {"gatewayClassName": "veil-waypoint"},
}


def authn(jwt_rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "RequestAuthentication",
        "metadata": {"namespace": "shop", "name": "jwt"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "catalog"}], "jwtRules": [jwt_rule]},
    }


def test_every_l7_kind_is_typed_by_the_writer():
    iss = Issuer()
    b = StateBuilder(fetch_jwks)
    for obj in (
        route("r1"),
        TRAFFIC,
        GRANT,
        GATEWAY,
        authn({"issuer": iss.iss, "jwks": iss.jwks()}),
    ):
        b.apply(obj)
    s = b.snapshot(1)
    assert [r.key for r in s.routes] == ["shop/r1"]
    assert s.traffic_policy("Service", "shop", "catalog") is s.traffic_policies[0]
    assert s.traffic_policy("Service", "shop", "other") is None
    assert s.reference_grants[0].grants("shop", "backend", "api")
    assert ("shop", "waypoint") in s.waypoints
    assert [a.name for a in s.request_authentications] == ["jwt"]
    assert s.invalid == {}


def test_a_bad_edit_is_attached_to_its_object_and_a_fix_or_delete_clears_it():
    b = StateBuilder()
    b.apply(route("r1"))
    b.apply(route("r2"))
    b.apply(route("r1", path_type="Glob"))  # an event: only r1 is parsed again
    s = b.snapshot(2)
    assert [r.key for r in s.routes] == ["shop/r2"]
    assert list(s.invalid) == [("HTTPRoute", "shop", "r1")]
    assert "HTTPRoute shop/r1" in s.invalid[("HTTPRoute", "shop", "r1")]
    b.apply(route("r1"))
    assert b.snapshot(3).invalid == {}
    b.apply(route("r1", path_type="Glob"))
    b.delete(object_key(route("r1")))
    s = b.snapshot(4)
    assert s.invalid == {} and [r.key for r in s.routes] == ["shop/r2"]


def test_a_jwks_uri_is_read_by_the_source_not_the_core(tmp_path):
    iss = Issuer()
    (tmp_path / "jwks.json").write_text(iss.jwks())
    uri = {"issuer": iss.iss, "jwksUri": f"file://{tmp_path}/jwks.json"}
    assert StateBuilder(fetch_jwks).snapshot(1).request_authentications == ()
    with_fetch = StateBuilder(fetch_jwks)
    with_fetch.apply(authn(uri))
    assert len(with_fetch.snapshot(1).request_authentications) == 1
    without = StateBuilder()  # a writer that cannot fetch says so, on the object
    without.apply(authn(uri))
    s = without.snapshot(1)
    assert s.request_authentications == ()
    assert "cannot be fetched here" in s.invalid[("RequestAuthentication", "shop", "jwt")]


def test_authorization_policy_errors_are_attached_too():
    b = StateBuilder()
    b.apply(
        {
            "apiVersion": "security.veil.dev/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "shop", "name": "bad"},
            "spec": {"action": "MAYBE"},
        }
    )
    assert ("AuthorizationPolicy", "shop", "bad") in b.snapshot(1).invalid


def test_no_consumer_reads_raw_objects():
    """`MeshState.others` is for config dumps; everything a decision needs is typed."""
    offenders = []
    for folder in ("runtime", "agent", "waypoint", "ca"):
        for path in (ROOT / folder).rglob("*.py"):
            if re.search(r"\.others\b", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.parametrize(
    ("owners", "labels", "owner"),
    [
        ([{"kind": "Deployment", "name": "web"}], {}, "web"),  # the lab's manifest mode
        (  # Kubernetes: a Deployment's pods belong to a ReplicaSet named <deployment>-<hash>
            [{"kind": "ReplicaSet", "name": "web-7d9f8c6b5"}],
            {"pod-template-hash": "7d9f8c6b5"},
            "web",
        ),
        ([{"kind": "ReplicaSet", "name": "bare-rs"}], {}, "bare-rs"),  # a ReplicaSet of its own
        ([{"kind": "StatefulSet", "name": "db"}], {}, "db"),
        ([], {}, ""),
    ],
)
def test_a_pods_workload_is_its_deployment_as_istio_names_it(owners, labels, owner):
    from veil.core.state import workload_from  # noqa: PLC0415

    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "n", "labels": labels, "ownerReferences": owners},
        "spec": {},
    }
    assert workload_from(pod).owner == owner
