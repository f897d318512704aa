"""Who is asking: node credentials, and what a node may obtain.

`NodeAuthenticator` is the interface. The lab's daemons use `BootstrapTokens` (a per-node
secret that `veil lab up` writes into the node's own directory, stored by the CA only as a
SHA-256, with an expiry). On Kubernetes, `TokenReviewAuthenticator` checks a projected
service-account token (audience `veil-ca`) with the API server's TokenReview: the token is
bound to a pod, and the API server says which pod and node. An agent's token (the agent's
service account) may obtain the identities of workloads on its node; any other pod's token
(a waypoint's) only its own service account's identity. `credential_from_review` is the pure
decision; `Authenticators` tries each in turn (the lab's kubernetes mode has both).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from veil.core.spiffe import SpiffeId
from veil.core.state import MeshState


class AuthError(Exception):
    """Refused: carries the HTTP status (401 who are you, 403 not allowed) and a reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class NodeCredential:
    node: str
    identity: str | None = None  # a workload's credential: only this identity (its own)


class NodeAuthenticator(Protocol):
    async def authenticate(self, bearer: str | None) -> NodeCredential: ...


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_tokens_file(
    path: Path,
    entries: dict[str, tuple[str, datetime.datetime]],
    workloads: Sequence[tuple[str, str, str, datetime.datetime]] = (),
) -> None:
    """entries: node -> (token, expiry); workloads: (node, identity, token, expiry), credentials
    a pod (a waypoint) uses for its own identity only. Only hashes are written."""
    doc = {
        "tokens": [
            {"node": node, "sha256": token_hash(tok), "expires": exp.isoformat()}
            for node, (tok, exp) in sorted(entries.items())
        ]
        + [
            {
                "node": node,
                "identity": identity,
                "sha256": token_hash(tok),
                "expires": exp.isoformat(),
            }
            for node, identity, tok, exp in workloads
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.chmod(0o600)
    tmp.replace(path)


class BootstrapTokens:
    """Node bootstrap tokens from a YAML file of hashes (re-read when it changes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: no bootstrap tokens at all
        self._mtime: int | None = None
        self._entries: list[tuple[str, str, datetime.datetime, str | None]] = []

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._entries, self._mtime = [], None
            return
        if mtime == self._mtime:
            return
        doc = yaml.safe_load(self.path.read_text()) or {}
        self._entries = [
            (
                e["node"],
                e["sha256"],
                datetime.datetime.fromisoformat(e["expires"]),
                e.get("identity"),
            )
            for e in doc.get("tokens", [])
        ]
        self._mtime = mtime

    async def authenticate(self, bearer: str | None) -> NodeCredential:
        return self.check(bearer)

    def check(self, bearer: str | None) -> NodeCredential:
        if not bearer:
            raise AuthError(
                401,
                "no_credential",
                "no node credential (Authorization: Bearer <token>) in the request",
            )
        self._load()
        digest = token_hash(bearer)
        for node, expected, expires, identity in self._entries:
            if hmac.compare_digest(digest, expected):
                if datetime.datetime.now(datetime.UTC) >= expires:
                    raise AuthError(
                        401,
                        "credential_expired",
                        f"the bootstrap credential of node {node} expired at {expires.isoformat()}",
                    )
                return NodeCredential(node=node, identity=identity)
        raise AuthError(401, "unknown_credential", "unknown node credential")


AUDIENCE = "veil-ca"
POD_NAME = "authentication.kubernetes.io/pod-name"
NODE_NAME = "authentication.kubernetes.io/node-name"


def credential_from_review(
    status: Mapping[str, Any], agent_account: tuple[str, str], trust_domain: str
) -> NodeCredential:
    """What a TokenReview's answer lets the caller obtain. The token must be authenticated
    for our audience, belong to a service account and be bound to a pod on a node (a
    projected token, not a long-lived Secret one). Pure."""
    if not status.get("authenticated"):
        why = status.get("error") or "not authenticated"
        raise AuthError(401, "token_rejected", f"the API server rejected the token: {why}")
    if AUDIENCE not in (status.get("audiences") or []):
        raise AuthError(401, "wrong_audience", f"the token is not for audience {AUDIENCE!r}")
    user = status.get("user") or {}
    parts = str(user.get("username", "")).split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        raise AuthError(401, "not_a_service_account", "the token is no service account's")
    namespace, account = parts[2], parts[3]
    extra = user.get("extra") or {}
    node = (extra.get(NODE_NAME) or [None])[0]
    if not (extra.get(POD_NAME) or [None])[0] or not node:
        raise AuthError(
            401,
            "not_pod_bound",
            "the token is not bound to a pod on a node (use a projected service-account "
            f"token with audience {AUDIENCE!r})",
        )
    if (namespace, account) == agent_account:
        return NodeCredential(node=str(node))
    return NodeCredential(node=str(node), identity=str(SpiffeId(trust_domain, namespace, account)))


class TokenReviewAuthenticator:
    """Kubernetes: a projected service-account token, checked with the API server's
    TokenReview (the CA needs `create tokenreviews`, as in system:auth-delegator). An answer
    is kept for a minute, so a pod renewing several certificates costs one review."""

    CACHE_SECONDS = 60.0

    def __init__(
        self,
        review: Callable[[str], Awaitable[Mapping[str, Any]]],
        agent_account: tuple[str, str],
        trust_domain: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.review, self.agent_account, self.trust_domain = review, agent_account, trust_domain
        self.clock = clock
        self._cache: dict[str, tuple[float, NodeCredential]] = {}

    async def authenticate(self, bearer: str | None) -> NodeCredential:
        if not bearer:
            raise AuthError(401, "no_credential", "no token (Authorization: Bearer <token>)")
        key, now = token_hash(bearer), self.clock()
        cached = self._cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        try:
            status = await self.review(bearer)
        except Exception as e:
            raise AuthError(503, "review_failed", f"TokenReview failed: {e}") from None
        cred = credential_from_review(status, self.agent_account, self.trust_domain)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now + self.CACHE_SECONDS, cred)
        return cred


def lightkube_review(client: Any) -> Callable[[str], Awaitable[Mapping[str, Any]]]:
    """TokenReview through a lightkube AsyncClient."""
    from lightkube.models.authentication_v1 import TokenReviewSpec  # noqa: PLC0415
    from lightkube.resources.authentication_v1 import TokenReview  # noqa: PLC0415

    async def review(token: str) -> Mapping[str, Any]:
        req = TokenReview(spec=TokenReviewSpec(token=token, audiences=[AUDIENCE]))
        got = await client.create(req)
        return got.status.to_dict() if got.status else {}

    return review


class Authenticators:
    """The first that knows the credential: a bootstrap token is looked up, anything else
    that looks like a JWT goes to TokenReview."""

    def __init__(self, tokens: BootstrapTokens, review: TokenReviewAuthenticator | None) -> None:
        self.tokens, self.review = tokens, review

    async def authenticate(self, bearer: str | None) -> NodeCredential:
        if self.review is not None and bearer and bearer.count(".") == 2:
            return await self.review.authenticate(bearer)
        return self.tokens.check(bearer)


def authorize(state: MeshState, node: NodeCredential, identity: SpiffeId) -> None:
    """A node may obtain an identity only while a workload with it is scheduled there; a
    workload's credential only its own identity."""
    if node.identity is not None and node.identity != str(identity):
        raise AuthError(
            403,
            "not_this_identity",
            f"this credential is for {node.identity} only, not {identity}",
        )
    if identity in state.identities_on_node(node.node, identity.trust_domain):
        return
    elsewhere = sorted(
        {
            w.node
            for w in state.workloads
            if w.identity(identity.trust_domain) == identity and w.node
        }
    )
    hint = f" (it runs on {', '.join(elsewhere)})" if elsewhere else " (no workload has it)"
    raise AuthError(
        403,
        "not_on_node",
        f"node {node.node} may not obtain {identity}: no workload with service "
        f"account {identity.namespace}/{identity.service_account} is scheduled on "
        f"it{hint}",
    )
