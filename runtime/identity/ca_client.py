"""Asking the mesh CA for a certificate (TLS to 15012, node credential as a bearer token)."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from veil.core.spiffe import SpiffeId
from veil.runtime import http
from veil.runtime.identity.tls import ca_client_context

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0


class CaClientError(Exception):
    """The CA refused (status 4xx, `code` from its answer) or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code}, status {status})" if status else message)
        self.status, self.code, self.message = status, code, message


class CaClientConfig(Protocol):
    """What a daemon's configuration says about reaching the CA."""

    @property
    def ca_address(self) -> tuple[str, int]: ...
    @property
    def ca_server_name(self) -> str: ...
    @property
    def ca_root(self) -> Path: ...
    @property
    def token_file(self) -> Path: ...


@dataclass(frozen=True)
class CaEndpoint:
    host: str
    port: int
    server_name: str  # a DNS name in the CA's serving certificate
    root_file: Path  # trust anchor for dialling the CA (lab: nodes/<node>/ca-root.pem)
    token_file: Path  # the node credential, re-read on every request (it may rotate)

    @classmethod
    def of(cls, cfg: CaClientConfig) -> CaEndpoint:
        """The CA as a daemon's configuration names it (agent or waypoint)."""
        return cls(
            cfg.ca_address[0], cfg.ca_address[1], cfg.ca_server_name, cfg.ca_root, cfg.token_file
        )

    async def request(
        self, identity: SpiffeId, csr_pem: bytes, ttl_seconds: int | None = None
    ) -> dict[str, Any]:
        try:
            token = self.token_file.read_text().strip()
            ctx = ca_client_context(self.root_file.read_text())
        except OSError as e:
            raise CaClientError(
                0, "no_credential", f"cannot read the node credential or CA root: {e}"
            ) from None
        body: dict[str, Any] = {"identity": str(identity), "csr": csr_pem.decode()}
        if ttl_seconds:
            body["ttlSeconds"] = ttl_seconds
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(self.host, self.port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=self.server_name)
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    await stream.do_handshake()
                    status, _h, data = await http.request(
                        stream,
                        "POST",
                        "/v1/certificates",
                        self.server_name,
                        headers={
                            "authorization": f"Bearer {token}",
                            "content-type": "application/json",
                        },
                        body=json.dumps(body).encode(),
                    )
            finally:
                with trio.move_on_after(1):
                    await stream.aclose()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise CaClientError(
                0,
                "unreachable",
                f"CA {self.host}:{self.port} unreachable: "
                f"{e or type(e).__name__} (is `veil ca` running, and "
                "port 15012 reachable from this node?)",
            ) from None
        try:
            doc = json.loads(data)
        except ValueError:
            raise CaClientError(status, "bad_answer", "the CA answered with no JSON") from None
        if status != 200:
            raise CaClientError(status, str(doc.get("code", "")), str(doc.get("error", "")))
        if not isinstance(doc, dict):
            raise CaClientError(status, "bad_answer", "the CA's answer is not an object")
        return doc
