"""The CA on Kubernetes: what a TokenReview's answer lets the caller obtain (pure), the
authenticator's cache, and which authenticator a credential goes to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from veil.ca.auth import (
    Authenticators,
    AuthError,
    BootstrapTokens,
    NodeCredential,
    TokenReviewAuthenticator,
    credential_from_review,
)

AGENT = ("veil-system", "veil-agent")


def review(
    user: str = "system:serviceaccount:shop:waypoint",
    pod: str | None = "waypoint-7d9-x",
    node: str | None = "node1",
    audiences: tuple[str, ...] = ("veil-ca",),
    authenticated: bool = True,
) -> dict[str, Any]:
    extra = {}
    if pod:
        extra["authentication.kubernetes.io/pod-name"] = [pod]
    if node:
        extra["authentication.kubernetes.io/node-name"] = [node]
    return {
        "authenticated": authenticated,
        "audiences": list(audiences),
        "user": {"username": user, "extra": extra},
    }


def test_an_agents_token_is_its_nodes_credential():
    got = credential_from_review(
        review("system:serviceaccount:veil-system:veil-agent", "veil-agent-abc", "node2"),
        AGENT,
        "cluster.local",
    )
    assert got == NodeCredential(node="node2")


def test_any_other_pods_token_obtains_only_its_own_identity():
    got = credential_from_review(review(), AGENT, "cluster.local")
    assert got == NodeCredential(
        node="node1", identity="spiffe://cluster.local/ns/shop/sa/waypoint"
    )


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (review(authenticated=False), "token_rejected"),
        (review(audiences=("https://kubernetes.default.svc",)), "wrong_audience"),
        (review(user="kubernetes-admin"), "not_a_service_account"),
        (review(pod=None), "not_pod_bound"),  # a long-lived Secret token
        (review(node=None), "not_pod_bound"),
    ],
)
def test_what_is_refused(answer, code):
    with pytest.raises(AuthError) as e:
        credential_from_review(answer, AGENT, "cluster.local")
    assert e.value.code == code and e.value.status == 401


async def test_a_review_is_kept_for_a_minute():
    calls: list[str] = []
    now = [0.0]

    async def api(token: str) -> dict[str, Any]:
        calls.append(token)
        return review()

    auth = TokenReviewAuthenticator(api, AGENT, "cluster.local", clock=lambda: now[0])
    for _ in range(3):
        await auth.authenticate("a.b.c")
    now[0] = 61.0
    await auth.authenticate("a.b.c")
    assert calls == ["a.b.c", "a.b.c"]


async def test_an_api_failure_refuses_with_503():
    async def api(token: str) -> dict[str, Any]:
        raise OSError("connection refused")

    auth = TokenReviewAuthenticator(api, AGENT, "cluster.local")
    with pytest.raises(AuthError) as e:
        await auth.authenticate("a.b.c")
    assert e.value.status == 503


async def test_jwts_go_to_token_review_and_bootstrap_tokens_to_the_file(tmp_path: Path):
    seen: list[str] = []

    async def api(token: str) -> dict[str, Any]:
        seen.append(token)
        return review()

    both = Authenticators(
        BootstrapTokens(tmp_path / "none.yaml"),
        TokenReviewAuthenticator(api, AGENT, "cluster.local"),
    )
    assert (await both.authenticate("h.p.s")).identity
    with pytest.raises(AuthError, match="unknown node credential"):
        await both.authenticate("a-bootstrap-token")
    assert seen == ["h.p.s"]
