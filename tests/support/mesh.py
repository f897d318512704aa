"""An in-process CA wired to real cluster state: the seeded fake tests and the lab share."""

from __future__ import annotations

import datetime
import json
import ssl
from pathlib import Path
from typing import Any

import trio
import trio.testing

from veil.ca.auth import BootstrapTokens, new_token, write_tokens_file
from veil.ca.server import CaService
from veil.ca.signer import Signer, generate_root
from veil.core.spiffe import SpiffeId
from veil.core.state import build_state
from veil.runtime.http import Request
from veil.runtime.identity.manager import CertificateManager, Fetcher
from veil.runtime.identity.tls import verify_peer
from veil.runtime.store import StateStore

TD = "cluster.local"


def pod(ns: str, name: str, node: str, sa: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa},
        "status": {"phase": phase, "podIP": "10.244.1.10"},
    }


SHOP_PODS = [
    pod("shop", "frontend-0", "node1", "frontend"),
    pod("shop", "frontend-1", "node2", "frontend"),
    pod("shop", "catalog-0", "node2", "catalog"),
    pod("shop", "old-0", "node1", "retired", phase="Succeeded"),
]


class InProcessCa:
    """A CaService with bootstrap tokens for node1 and node2, and a fetcher per node."""

    def __init__(
        self,
        tmp: Path,
        ttl: datetime.timedelta = datetime.timedelta(hours=1),
        pods: list[dict[str, Any]] | None = None,
    ) -> None:
        self.signer = Signer(generate_root(TD), TD, default_ttl=ttl)
        self.tokens = {n: new_token() for n in ("node1", "node2")}
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        self.tokens_file = tmp / "tokens.yaml"
        write_tokens_file(self.tokens_file, {n: (t, expiry) for n, t in self.tokens.items()})
        self.state = StateStore(build_state(pods if pods is not None else SHOP_PODS, 1))
        self.service = CaService(
            self.signer, BootstrapTokens(self.tokens_file), self.state, state_grace=0.1
        )
        self.fail_next = 0

    async def post(self, body: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        resp = await self.service.handle(
            Request("POST", "/v1/certificates", headers, body, "127.0.0.1:1")
        )
        return resp.status, json.loads(resp.body)

    def fetcher(self, node: str) -> Fetcher:
        async def fetch(identity: SpiffeId, csr_pem: bytes) -> dict[str, Any]:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise ConnectionError("CA unreachable (injected)")
            status, doc = await self.post(
                json.dumps({"identity": str(identity), "csr": csr_pem.decode()}).encode(),
                self.tokens[node],
            )
            if status != 200:
                raise RuntimeError(f"{status}: {doc}")
            return doc

        return fetch


FRONTEND = SpiffeId(TD, "shop", "frontend")
CATALOG = SpiffeId(TD, "shop", "catalog")


async def run_manager(nursery, fetch, **kw):
    mgr = CertificateManager(fetch, **kw)
    await nursery.start(mgr.run)
    return mgr


async def handshake(server_cred, client_cred, expected):
    """A real TLS 1.3 handshake over an in-memory stream pair; returns both peer identities."""
    a, b = trio.testing.memory_stream_pair()
    server = trio.SSLStream(a, server_cred.server_context, server_side=True)
    client = trio.SSLStream(b, client_cred.client_context, server_hostname=None)
    errors: list[BaseException] = []

    async def side(stream):
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            errors.append(e)
            await stream.transport_stream.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(side, server)
        n.start_soon(side, client)
    if errors:
        raise errors[0]
    assert client.selected_alpn_protocol() == "h2"
    seen_by_client = verify_peer(client._ssl_object, expected=expected)
    seen_by_server = verify_peer(server._ssl_object, trust_domain=TD)
    return seen_by_client, seen_by_server
