"""The CA's I/O: TLS listener on 15012 with a JSON API, audit log, metrics (docs/ca.md).

    POST /v1/certificates   Authorization: Bearer <node credential>
                            {"identity": "spiffe://...", "csr": "<PEM>", "ttlSeconds": 3600}
                         -> 200 {"identity", "certChain": [leaf, ...], "trustBundle": [...],
                                 "notAfter", "serial"}
                         -> 4xx {"error": "<reason>", "code": "<code>"}
    GET  /v1/trust-bundle -> 200 {"trustBundle": [...]}
    GET  /healthz         -> 200 ok (503 until cluster state is loaded)

Order of checks: who is asking (401), is the request well formed (400), may that node have
that identity (403), then sign. Every issuance and refusal is one JSON audit line.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from veil.ca.auth import AuthError, NodeAuthenticator, NodeCredential, authorize
from veil.ca.signer import Issued, Signer, SignError
from veil.core.certs import pem
from veil.core.ratelimit import TokenBucket
from veil.core.spiffe import SpiffeId
from veil.runtime import guard
from veil.runtime.http import Request, Response
from veil.runtime.store import StateStore

audit = logging.getLogger("veil.ca.audit")
MAX_TTL_SECONDS = 30 * 24 * 3600
STATE_GRACE = 1.0  # seconds to wait for a fresher snapshot before refusing
# Certificates one node may ask for: 20 a second, bursts of 200 (a restarting agent asks for
# every identity on its node at once). Past it: 429, counted as refused{code="rate_limited"}.
NODE_RATE = (20.0, 200.0)


@dataclass
class CaMetrics:
    registry: CollectorRegistry
    issued: Counter
    refused: Counter
    root_expiry: Gauge

    @classmethod
    def create(cls) -> CaMetrics:
        reg = CollectorRegistry()
        guard.register(reg)
        return cls(
            registry=reg,
            issued=Counter(
                "veil_ca_certificates_issued", "Workload certificates issued", registry=reg
            ),
            refused=Counter(
                "veil_ca_certificates_refused",
                "Certificate requests refused, by reason",
                ["code"],
                registry=reg,
            ),
            root_expiry=Gauge(
                "veil_ca_root_expiry_timestamp_seconds",
                "When the CA's signing certificate expires (Unix time)",
                registry=reg,
            ),
        )


class CaService:
    def __init__(
        self,
        signer: Signer,
        authenticator: NodeAuthenticator,
        state: StateStore,
        metrics: CaMetrics | None = None,
        state_grace: float = STATE_GRACE,
        *,
        node_rate: tuple[float, float] = NODE_RATE,
    ) -> None:
        self.state_grace = state_grace
        self.node_rate = node_rate
        self._buckets: dict[str, TokenBucket] = {}
        self.signer = signer
        self.authenticator = authenticator
        self.state = state
        self.metrics = metrics or CaMetrics.create()
        self.metrics.root_expiry.set(signer.material.cert.not_valid_after_utc.timestamp())

    async def handle(self, req: Request) -> Response:
        if req.path == "/healthz":
            return Response.text(
                200 if self.state.loaded else 503,
                "ok\n" if self.state.loaded else "state not loaded\n",
            )
        if req.path == "/v1/trust-bundle":
            if req.method != "GET":
                return _error(405, "method_not_allowed", "use GET")
            return Response.json(200, {"trustBundle": self.signer.material.bundle_pem()})
        if req.path == "/v1/certificates":
            if req.method != "POST":
                return _error(405, "method_not_allowed", "use POST")
            return await self.certificates(req)
        return _error(404, "not_found", f"no such endpoint {req.path}")

    async def certificates(self, req: Request) -> Response:
        node = identity = None
        try:
            bearer = _bearer(req.headers.get("authorization"))
            node = await self.authenticator.authenticate(bearer)
            bucket = self._buckets.get(node.node)
            if bucket is None:
                bucket = self._buckets[node.node] = TokenBucket(*self.node_rate)
            if not bucket.take(time.monotonic()):
                raise SignError(
                    429,
                    "rate_limited",
                    f"node {node.node} asked for more than {self.node_rate[0]:g} certificates "
                    f"a second (burst {self.node_rate[1]:g}); retry with backoff",
                )
            doc = _json_object(req.body)
            raw_identity = _field(doc, "identity", str)
            csr_pem = _field(doc, "csr", str)
            ttl = doc.get("ttlSeconds")
            if ttl is not None and (
                not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL_SECONDS
            ):
                raise SignError(
                    400, "bad_request", f"ttlSeconds must be an integer from 1 to {MAX_TTL_SECONDS}"
                )
            identity = self.signer.parse_identity(raw_identity)
            csr = self.signer.check_csr(csr_pem.encode(), identity)
            if not self.state.loaded:
                raise SignError(503, "state_not_loaded", "the CA has not read cluster state yet")
            await self._authorize(node, identity)
            issued = self.signer.sign(
                csr, identity, datetime.timedelta(seconds=ttl) if ttl else None
            )
        except (AuthError, SignError) as e:
            self.metrics.refused.labels(code=e.code).inc()
            self._audit(
                "refused",
                req,
                node.node if node else None,
                identity,
                status=e.status,
                code=e.code,
                reason=e.message,
            )
            return _error(e.status, e.code, e.message)
        self.metrics.issued.inc()
        self._audit(
            "issued",
            req,
            node.node,
            identity,
            status=200,
            serial=f"{issued.serial:x}",
            notAfter=issued.leaf.not_valid_after_utc.isoformat(),
        )
        return Response.json(200, _issued_doc(issued, self.signer.material.bundle_pem()))

    async def _authorize(self, node: NodeCredential, identity: SpiffeId) -> None:
        """Authorize against the snapshot; on a miss, give a lagging snapshot one chance.

        An agent and the CA read cluster state independently, so an agent may ask for a new
        pod's identity a moment before the CA's snapshot shows that pod. Waiting (bounded) for
        the next snapshot turns that race into a short delay instead of a refusal.
        """
        state = self.state.current
        try:
            authorize(state, node, identity)
            return
        except AuthError:
            with trio.move_on_after(self.state_grace):
                state = await self.state.wait_newer(state.version)
            authorize(self.state.current, node, identity)

    def _audit(
        self, event: str, req: Request, node: str | None, identity: object, **fields: Any
    ) -> None:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "peer": req.peer,
            "node": node,
            "identity": str(identity) if identity else None,
            **fields,
        }
        audit.info("%s", json.dumps(line))

    async def metrics_handler(self, req: Request) -> Response:
        if req.path != "/metrics":
            return _error(404, "not_found", "only /metrics here")
        return Response(
            200, generate_latest(self.metrics.registry), "text/plain; version=0.0.4; charset=utf-8"
        )


def _issued_doc(issued: Issued, bundle: list[str]) -> dict[str, Any]:
    return {
        "identity": str(issued.identity),
        "certChain": [pem(c) for c in issued.chain],
        "trustBundle": bundle,
        "notAfter": issued.leaf.not_valid_after_utc.isoformat(),
        "serial": f"{issued.serial:x}",
    }


def _error(status: int, code: str, message: str) -> Response:
    return Response.json(status, {"error": message, "code": code})


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "bad_credential", "Authorization must be 'Bearer <token>'")
    return value.strip()


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SignError(400, "bad_request", "the body is not JSON") from None
    except RecursionError:  # `[[[[...]]]]` deeper than the parser's stack
        raise SignError(400, "bad_request", "the body's JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise SignError(400, "bad_request", "the body must be a JSON object")
    return doc


def _field(doc: dict[str, Any], name: str, typ: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, typ):
        raise SignError(
            400, "bad_request", f"field {name!r} is required and must be a {typ.__name__}"
        )
    return value
