"""Who is asking: node credentials, and what a node may obtain.

`NodeAuthenticator` is the interface; the lab uses `BootstrapTokens` (a per-node secret that
`veil lab up` writes into the node's own directory, stored by the CA only as a SHA-256, with an
expiry). On Kubernetes, `TokenReviewAuthenticator` will check a projected service-account
token with the TokenReview API and map the agent pod to its node.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    def authenticate(self, bearer: str | None) -> NodeCredential: ...


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

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self._entries: list[tuple[str, str, datetime.datetime, str | None]] = []

    def _load(self) -> None:
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

    def authenticate(self, bearer: str | None) -> NodeCredential:
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


class TokenReviewAuthenticator:
    """Kubernetes: a projected service-account token, checked with TokenReview (not yet)."""

    def __init__(self, api_server: str, audience: str = "veil-ca") -> None:
        self.api_server, self.audience = api_server, audience

    def authenticate(self, bearer: str | None) -> NodeCredential:
        raise AuthError(
            501, "not_implemented", "TokenReview authentication arrives with the Kubernetes source"
        )


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
