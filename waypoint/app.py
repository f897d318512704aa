"""`veil waypoint`: a namespace's L7 proxy, reached over HBONE and tunnelling on over HBONE.

    agent (client pod) == HBONE, :authority <VIP>:<port> ==> waypoint :15008
        HTTP/1.1 (h11): per request, HTTPRoute rule -> weighted backend Service -> a ready pod
            == HBONE, :authority <pod IP>:<port>, pooled keep-alive ==> the pod's agent -> app
        anything else: TCP to a ready pod of the service, over HBONE

The waypoint runs in its own pod (not captured: it speaks HBONE itself) as identity
spiffe://<td>/ns/<ns>/sa/<gateway>, with a certificate from the mesh CA obtained with the
pod's own credential. Cluster state comes through the same source interface as the agent's.
Every request is counted with Istio's request metrics and logged as one JSON line.

Resource handling: one nursery owns the listener, the certificate manager, the state source
and the upstream tunnel pool; each HBONE connection owns its stream handlers; upstream
HTTP/1.1 connections go back to an idle pool only when both sides finished a message cleanly.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry

from veil.core import admission, clienthello
from veil.core.admission import Admission
from veil.core.extauthz import Allowed, Denied
from veil.core.hbone import (
    INGRESS_HEADER,
    BadRequest,
    ErrorCode,
    RequestReceived,
    check_request,
)
from veil.core.ports import HBONE_PORT, METRICS_PORT, READY_PORT
from veil.core.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from veil.core.state import MeshState
from veil.runtime import guard, heap, http
from veil.runtime.config import CA_SERVER_NAME, check_state_source
from veil.runtime.hbone.io import HboneError, HboneIO, Stream
from veil.runtime.hbone.pool import HbonePool
from veil.runtime.hbone.server import HboneServer
from veil.runtime.identity.ca_client import CaEndpoint
from veil.runtime.identity.manager import CertificateManager
from veil.runtime.lifecycle import run_until_signalled
from veil.runtime.listener import serve
from veil.runtime.sources import open_source
from veil.runtime.sources.jwks import JwksCache
from veil.runtime.store import StateStore
from veil.runtime.telemetry.admin import AdminService
from veil.waypoint import http1, normalize, pipeline
from veil.waypoint.exchange import DIAL_ERRORS, Forwarder, Request
from veil.waypoint.http2 import H2Exchange, H2Server
from veil.waypoint.messages import HttpError, drain_request, local_reply, relay
from veil.waypoint.normalize import PathNormalization
from veil.waypoint.pipeline import Caller, Check, Destination, Outcome, Redirect, Reply
from veil.waypoint.resilience import Limits
from veil.waypoint.telemetry import RequestMetrics, RequestRecord
from veil.waypoint.upstreams import Upstreams

log = logging.getLogger("veil.waypoint")
DETECT_TIMEOUT = 5.0  # a client silent this long (a server-first protocol) is relayed as TCP


@dataclass(frozen=True)
class WaypointConfig:
    gateway: str
    namespace: str
    state_dir: Path | None
    ca_address: tuple[str, int]
    ca_root: Path
    token_file: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_server_name: str = CA_SERVER_NAME
    listen: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    metrics_listen: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    ready_listen: tuple[str, int] = ("0.0.0.0", READY_PORT)
    path_normalization: PathNormalization = normalize.DEFAULT
    kubeconfig: str | None = None  # the Kubernetes API as the state source, not state_dir

    def __post_init__(self) -> None:
        check_state_source(self.state_dir, self.kubeconfig)


class WaypointServer:
    def __init__(self, cfg: WaypointConfig) -> None:
        self.cfg = cfg
        self.identity = SpiffeId(cfg.trust_domain, cfg.namespace, cfg.gateway)
        self.store = StateStore()
        self.registry = CollectorRegistry()
        guard.register(self.registry)
        self.heap = heap.register(self.registry)
        self.admission = Admission()
        admission.register(self.admission, self.registry)
        self.certs = CertificateManager(CaEndpoint.of(cfg).request, registry=self.registry)
        self.metrics = RequestMetrics(self.registry)
        self.hbone = HboneServer(
            self.certs,
            self.identity,
            cfg.trust_domain,
            self.admission,
            scope="waypoint",
            name=f"waypoint {cfg.namespace}/{cfg.gateway}",
            on_request=self._on_request,
        )
        self.me = pipeline.ThisWaypoint(
            cfg.namespace, cfg.gateway, cfg.trust_domain, cfg.path_normalization
        )
        self.rng = random.Random()
        # Keys of issuers with an https jwksUri or OIDC discovery, fetched here (not by the
        # state's writer) and refreshed.
        self.jwks = JwksCache(lambda: self.store.current.request_authentications)
        self.limits = Limits()
        self.upstreams: Upstreams | None = None  # from run(): they need its nursery
        self.forwarder: Forwarder | None = None
        self.admin = AdminService(self.config_dump, self.not_ready, self.registry)
        self.listening = False
        self._seen: MeshState | None = None

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> MeshState:
        """The current snapshot (typed by its writer); what it refuses is logged once."""
        state = self.store.current
        if state is not self._seen:
            before = self._seen.invalid if self._seen is not None else {}
            for key, err in state.invalid.items():
                if before.get(key) != err:
                    log.error("%s", err)
            self._seen = state
        return state

    def not_ready(self) -> str | None:
        if not self.store.loaded:
            return "cluster state not loaded"
        if self.certs.current(self.identity) is None:
            return f"no certificate yet for {self.identity}"
        if not self.listening:
            return "not listening yet"
        return None

    def config_dump(self) -> dict[str, Any]:
        return {
            "waypoint": f"{self.cfg.namespace}/{self.cfg.gateway}",
            "identity": str(self.identity),
            "snapshot": self.store.current.version,
            "routes": [r.key for r in self.state().routes],
            "certificates": self.certs.snapshot(),
        }

    # -- serving -------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg

        async def start(nursery: trio.Nursery) -> None:
            await nursery.start(self.metrics.access.run)
            nursery.start_soon(heap.give_back_after_peaks, self.heap)
            await nursery.start(self.certs.run)
            self.certs.set_identities({self.identity})
            await nursery.start(open_source(cfg.state_dir, cfg.kubeconfig).run, self.store)
            await nursery.start(self.jwks.run)
            pool = HbonePool(nursery)
            nursery.start_soon(pool.reap_idle)
            self.upstreams = Upstreams(pool, self.certs, self.identity, cfg.trust_domain)
            self.forwarder = Forwarder(
                self.state, self.upstreams, self.limits, self.metrics, self.rng, nursery
            )
            for handler, (host, port) in (
                (self.admin.metrics, cfg.metrics_listen),
                (self.admin.readiness, cfg.ready_listen),
            ):
                await nursery.start(
                    lambda task_status, h=handler, a=host, p=port: http.serve(
                        h, a, p, task_status=task_status
                    )
                )
            await self.certs.get(self.identity, timeout=60)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited
            listener.bind(cfg.listen)
            listener.listen(1024)
            nursery.start_soon(serve, listener, self.hbone.handle)
            self.listening = True
            log.info(
                "waypoint %s/%s up as %s on %s:%d",
                cfg.namespace,
                cfg.gateway,
                self.identity,
                *cfg.listen,
            )

        await run_until_signalled("waypoint", start)

    def destination(self, state: MeshState, target: tuple[str, int]) -> Destination | str:
        """What a CONNECT may reach through this waypoint, or why not (`pipeline.destination`)."""
        return pipeline.destination(state, self.me, target)

    def authorize_tcp(self, dest: Destination, caller: Caller, sni: str = "") -> str | None:
        """Why a non-HTTP stream is refused, or None if the policies allow it as TCP."""
        return pipeline.tcp_denied(self.state(), self.me, dest, caller, sni)

    def _on_request(self, ev: RequestReceived, io: HboneIO, peer_ip: str, peer: SpiffeId) -> None:
        req = check_request(ev)
        dest = (
            req.why
            if isinstance(req, BadRequest)
            else self.destination(self.store.current, req.target)
        )
        plaintext = not isinstance(req, BadRequest) and INGRESS_HEADER in req.headers
        if plaintext and not isinstance(dest, str):  # only the pod's own agent may say so
            dest = pipeline.plaintext_ingress(self.store.current, self.me, dest, peer) or dest
        if isinstance(req, BadRequest) or isinstance(dest, str):
            why = req.why if isinstance(req, BadRequest) else str(dest)
            log.info("HBONE from %s: 400, %s", peer, why)
            io.conn.respond(req.stream_id, 400, end_stream=True)
            io.queue_output()
            if (stream := io.streams.get(req.stream_id)) is not None:
                stream.close()
            return
        if not self.admission.take_stream():
            log.warning("HBONE from %s: 503, stream limit reached", peer)
            io.conn.respond(req.stream_id, 503, end_stream=True)
            io.queue_output()
            if (refused := io.streams.get(req.stream_id)) is not None:
                refused.close()
            return
        io.conn.respond(req.stream_id, 200)
        io.queue_output()
        stream = io.streams.get(req.stream_id)
        if stream is None:
            self.admission.drop_stream()
        else:
            client = req.forwarded_for
            caller = Caller(peer, client[0] if client else "", plaintext=plaintext)
            io.spawn(req.stream_id, self.serve_stream, stream, dest, caller)

    async def serve_stream(self, stream: Stream, dest: Destination, caller: Caller) -> None:
        try:
            await self._serve_stream(stream, dest, caller)
        finally:
            self.admission.drop_stream()

    async def _serve_stream(self, stream: Stream, dest: Destination, caller: Caller) -> None:
        try:
            kind, first = await self._detect(stream)
            if kind == "http1":
                await self.http1(stream, http1.skip_empty_lines(first), dest, caller)
            elif kind == "h2":
                await self.h2(stream, first, dest, caller)
            else:
                await self.tcp(stream, first, dest, caller)
        except HboneError:
            stream.reset()
        finally:
            stream.close()

    async def _detect(self, stream: Stream) -> tuple[str, bytes]:
        """Read until the protocol is certain (`http1.detect`), at most MAX_REQUEST_LINE bytes and
        DETECT_TIMEOUT seconds; what is still undecided then is TCP, judged as TCP."""
        buf = bytearray()
        with trio.move_on_after(DETECT_TIMEOUT):
            while (kind := http1.detect(bytes(buf))) is None:
                chunk = await stream.receive()
                if not chunk:
                    break
                buf += chunk
            else:
                return kind, bytes(buf)
        return "tcp", bytes(buf)

    async def tcp(self, stream: Stream, first: bytes, dest: Destination, caller: Caller) -> None:
        """Not HTTP: a TCP relay to one ready pod of the destination, over HBONE, once the
        policies in scope allow it as TCP (`authorize_tcp`), with the server name of a TLS
        ClientHello it starts with (`connection.sni`; read up to one record)."""
        first, sni = await self._client_hello(stream, first)
        denied = self.authorize_tcp(dest, caller, sni)
        if denied is not None:
            log.info("TCP from %s to %s denied: %s", caller.peer, dest.authority, denied)
            self.metrics.tcp_denied.inc()
            stream.reset(ErrorCode.CONNECT_ERROR)
            return
        state = self.state()
        routed = pipeline.tcp_backend(state, dest, caller, self.rng)
        if isinstance(routed, str):
            log.info("TCP from %s to %s refused: %s", caller.peer, dest.authority, routed)
            stream.reset(ErrorCode.CONNECT_ERROR)
            return
        service, port = routed if routed is not None else (dest.service, dest.port)
        target = (
            (dest.workload, dest.port)
            if dest.workload is not None
            else (pipeline.pick_endpoint(state, service, port, self.rng) if service else None)
        )
        if target is None or self.upstreams is None:
            log.info("TCP to %s: no ready endpoint", dest.authority)
            stream.reset()
            return
        try:
            up = await self.upstreams.tunnel(target[0], target[1], caller.ip, [])
        except DIAL_ERRORS as e:
            log.info("TCP to %s via %s failed: %s", dest.authority, target[0].key, e)
            stream.reset()
            return
        try:
            if first:
                await up.send(first)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, stream, up)
                nursery.start_soon(relay, up, stream)
        finally:
            up.close()

    async def _client_hello(self, stream: Stream, first: bytes) -> tuple[bytes, str]:
        """More of the stream while it is an incomplete TLS ClientHello (at most one record,
        within the detection time), and its SNI ("" when none or not TLS)."""
        if not first:  # a server-first protocol: nothing to read a name from
            return first, ""
        buf = bytearray(first)
        with trio.move_on_after(DETECT_TIMEOUT):
            while (name := clienthello.server_name(bytes(buf))) is clienthello.Hello.NEED_MORE:
                chunk = await stream.receive()
                if not chunk:
                    break
                buf += chunk
        name = clienthello.server_name(bytes(buf))
        return bytes(buf), name if isinstance(name, str) else ""

    # -- HTTP/1.1 ------------------------------------------------------------------------------

    async def http1(self, stream: Stream, first: bytes, dest: Destination, caller: Caller) -> None:
        down = h11.Connection(h11.SERVER)
        down.receive_data(first)
        try:
            while True:
                ev = await self._request_head(down, stream)
                if not isinstance(ev, h11.Request):
                    break
                if not await self._one_request(down, stream, ev, dest, caller):
                    stream.reset()
                    return
                if down.our_state is h11.SWITCHED_PROTOCOL:
                    return  # a WebSocket: relayed to its end by the forwarder
                if down.our_state is h11.MUST_CLOSE or down.their_state is h11.MUST_CLOSE:
                    break
                if down.their_state is not h11.DONE:
                    await drain_request(down, stream)
                try:
                    down.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except h11.RemoteProtocolError as e:
            # Not HTTP/1.1 we can frame with certainty (two Host headers, an oversized head,
            # ambiguous framing, bad chunking): answered 400 when no response has begun, and
            # the stream ends, so nothing after the doubt is read as a request.
            log.info("HTTP/1.1 from %s refused: %s", caller.peer, e)
            if down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await local_reply(down, stream, 400, f"bad request: {e}")
            else:
                stream.reset()
                return
        await stream.send_eof()

    async def _request_head(self, down: h11.Connection, stream: Stream) -> Any:
        """The next event of a request's start (a Request, or the connection's end), with the
        head's raw bytes checked for ambiguous framing (`http1.framing_doubt`), which h11
        would let through: RemoteProtocolError then."""
        raw = bytearray(down.trailing_data[0])  # a pipelined head may have arrived already
        while True:
            ev = down.next_event()
            if ev is not h11.NEED_DATA:
                if isinstance(ev, h11.Request) and (doubt := http1.framing_doubt(bytes(raw))):
                    raise h11.RemoteProtocolError(f"ambiguous framing: {doubt}", 400)
                return ev
            try:
                data = await stream.receive()
            except HboneError:
                data = b""
            if len(raw) < http1.MAX_HEAD:
                raw += data
            down.receive_data(bytes(data))

    async def h2(self, stream: Stream, first: bytes, dest: Destination, caller: Caller) -> None:
        """HTTP/2 with prior knowledge: every request stream through the same logic."""

        async def one(ex: H2Exchange) -> None:
            if ex.request is None:
                await local_reply(ex, stream, 400, "bad HTTP/2 request head")
                return
            await self._one_request(ex, stream, ex.request, dest, caller)

        await H2Server(stream, one).run(first)

    async def _one_request(
        self,
        down: Any,
        stream: Stream,
        req: h11.Request,
        dest: Destination,
        caller: Caller,
    ) -> bool:
        """Serve one request and record it; False if the response broke off midway."""
        started = time.monotonic()
        rec = self._record(req, dest, caller)
        ok = True
        planned = self._plan(dest, caller, req)
        rec.path, rec.route = planned.path, planned.route
        rec.audit = planned.audited
        outcome: Outcome | Denied = planned
        if isinstance(outcome, Check):  # CUSTOM policies: their providers decide first
            outcome = await self._ask_providers(outcome, down, stream, req, dest, caller)
            if not isinstance(outcome, Denied):
                rec.path, rec.route, rec.audit = outcome.path, outcome.route, outcome.audited
        if isinstance(outcome, Denied):
            rec.response_code, rec.response_flags, rec.error = outcome.status, "UAEX", outcome.why
            await drain_request(down, stream)
            await local_reply(
                down, stream, outcome.status, outcome.why, outcome.headers, outcome.body
            )
        elif isinstance(outcome, Reply):
            rec.response_code, rec.response_flags, rec.error = (
                outcome.status,
                outcome.flags,
                outcome.why,
            )
            await local_reply(down, stream, outcome.status, outcome.why)
        else:
            try:
                if self.forwarder is None:
                    raise HttpError(503, "UH", "the waypoint is not serving yet")
                r = Request(down, stream, dest, rec, caller.ip)
                try:
                    assert not isinstance(outcome, Check)
                    if isinstance(outcome, Redirect):
                        await self.forwarder.redirect(outcome, r)
                    else:
                        await self.forwarder.forward(outcome, r)
                except h11.RemoteProtocolError as e:  # the client's body broke HTTP/1.1
                    raise HttpError(400, "DPE", f"bad request: {e}") from None
            except HttpError as e:
                rec.response_code, rec.response_flags, rec.error = e.status, e.flags, str(e)
                if down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await local_reply(down, stream, e.status, str(e))
                else:
                    ok = False
        rec.duration_ms = (time.monotonic() - started) * 1000
        self.metrics.record(rec)
        return ok

    async def _ask_providers(  # noqa: PLR0917
        self,
        check: Check,
        down: Any,
        stream: Stream,
        req: h11.Request,
        dest: Destination,
        caller: Caller,
    ) -> Outcome | Denied:
        """The providers' verdict, then the request planned again with it (DENY and ALLOW
        policies, routing); the waypoint not serving yet: denied, never passed."""
        if self.forwarder is None:
            return Denied(503, (), b"", "the waypoint is not serving yet")
        rec = RequestRecord(method="", path="", authority="")  # the check's own, not logged
        verdict = await self.forwarder.ask_providers(
            check, Request(down, stream, dest, rec, caller.ip)
        )
        if isinstance(verdict, Denied):
            return verdict
        return self._plan(dest, caller, req, verdict)

    def _plan(
        self,
        dest: Destination,
        caller: Caller,
        req: h11.Request,
        approved: tuple[Allowed, ...] | None = None,
    ) -> Outcome:
        return pipeline.plan(
            self.state(),
            self.me,
            dest,
            caller,
            req,
            rng=self.rng,
            remote_keys=self.jwks.keys_for,
            approved=approved,
        )

    def _record(self, req: h11.Request, dest: Destination, caller: Caller) -> RequestRecord:
        src = self.store.current.workloads_by_ip.get(caller.ip)
        return RequestRecord(
            method=req.method.decode(),
            path=req.target.decode("latin-1"),
            authority=dest.authority,
            source_workload=(src.owner or src.name) if src else "unknown",
            source_namespace=src.namespace if src else caller.namespace,
            source_principal="unknown" if caller.plaintext else str(caller.peer),
            destination_service=(
                f"{dest.service.name}.{dest.service.namespace}.svc.cluster.local"
                if dest.service
                else dest.authority
            ),
        )
