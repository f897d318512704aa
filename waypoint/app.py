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
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry

from veil.core import admission, jwt
from veil.core.admission import Admission
from veil.core.authz import Decision, Facts, HttpFacts, at_waypoint, decide
from veil.core.hbone import (
    BadRequest,
    ErrorCode,
    HboneConnection,
    RequestReceived,
    check_request,
)
from veil.core.ports import HBONE_PORT, METRICS_PORT, READY_PORT
from veil.core.ratelimit import TokenBucket
from veil.core.routes import (
    BackendRef,
    RequestFacts,
    Rule,
    Selected,
    pick_backend,
    reference_granted,
    replace_path,
    routes_for_client,
    select,
)
from veil.core.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from veil.core.state import MeshState, Service, Workload
from veil.core.traffic import (
    KIND,
    PoolLimits,
    RetryPolicy,
    TrafficPolicy,
)
from veil.runtime import guard, http
from veil.runtime.config import CA_SERVER_NAME
from veil.runtime.hbone.io import HboneError, HboneIO, Stream, TlsSocket
from veil.runtime.hbone.pool import HbonePool
from veil.runtime.identity.ca_client import CaEndpoint
from veil.runtime.identity.manager import CertificateManager, NoCertificate
from veil.runtime.identity.tls import PeerIdentityError, verify_peer
from veil.runtime.lifecycle import run_until_signalled
from veil.runtime.listener import serve
from veil.runtime.sources.manifests import ManifestSource
from veil.runtime.store import StateStore
from veil.runtime.telemetry.admin import AdminService
from veil.waypoint import http1, normalize
from veil.waypoint.http2 import H2Exchange, H2Server
from veil.waypoint.normalize import BadTarget, PathNormalization
from veil.waypoint.resilience import CircuitBreaker, OutlierDetector
from veil.waypoint.telemetry import RequestMetrics, RequestRecord

log = logging.getLogger("veil.waypoint")
CONNECT_TIMEOUT = 5.0
MAX_IDLE_UPSTREAMS = 16
DETECT_TIMEOUT = 5.0  # a client silent this long (a server-first protocol) is relayed as TCP


@dataclass(frozen=True)
class WaypointConfig:
    gateway: str
    namespace: str
    state_dir: Path
    ca_address: tuple[str, int]
    ca_root: Path
    token_file: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_server_name: str = CA_SERVER_NAME
    listen: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    metrics_listen: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    ready_listen: tuple[str, int] = ("0.0.0.0", READY_PORT)
    path_normalization: PathNormalization = normalize.DEFAULT


@dataclass(frozen=True)
class Destination:
    """What a CONNECT addressed: a service port (VIP) or one pod."""

    authority: str
    service: Service | None
    port: int
    workload: Workload | None = None
    # The Services whose Service-targeted policies apply: the addressed one, or for a pod
    # addressed by IP every Service of this namespace that selects it.
    policy_services: tuple[str, ...] = ()

    @property
    def services(self) -> tuple[str, ...]:
        if self.policy_services:
            return self.policy_services
        return (self.service.name,) if self.service is not None else ()


@dataclass
class Upstream:
    """An HTTP/1.1 client connection to one pod, over one HBONE stream."""

    key: tuple[str, str, int]  # (Service the request addressed, pod IP, port)
    stream: Stream
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


REPLAY_LIMIT = 64 * 1024  # bodies up to this size are kept for retries and mirrors


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    """The request body's length: its Content-Length, 0 without one, None if chunked."""
    if http1.is_chunked(headers):
        return None
    for n, v in headers:
        if n.lower() == "content-length":
            return int(v)
    return 0


class _TryFailed(Exception):
    """One try at a backend failed before a response head (retryable like a 503)."""

    def __init__(self, why: str, status: int = 503, flags: str = "UF") -> None:
        super().__init__(why)
        self.status, self.flags = status, flags


class HttpError(Exception):
    def __init__(self, status: int, flags: str, why: str) -> None:
        super().__init__(why)
        self.status, self.flags = status, flags


async def next_event(conn: Any, stream: Stream) -> Any:
    """The next h11 event, feeding it stream bytes as it needs them (an HTTP/2 exchange
    produces the same events itself)."""
    if isinstance(conn, H2Exchange):
        return await conn.next_event()
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        try:
            data = await stream.receive()
        except HboneError:
            data = b""
        conn.receive_data(bytes(data))


async def send(conn: Any, stream: Stream, event: Any) -> None:
    if isinstance(conn, H2Exchange):
        await conn.send(event)
        return
    data = conn.send(event)
    if data:
        await stream.send(data)


COALESCE = 64 * 1024


class Writer:
    """One message's output towards a stream, sent only when the proxy is about to wait for
    input, at the end of the message, or past 64 KiB: a small response leaves as one TLS
    record and one DATA frame instead of three (head, body, end)."""

    def __init__(self, conn: Any, stream: Stream) -> None:
        self.conn, self.stream = conn, stream
        self.buf = bytearray()

    async def send(self, event: Any) -> None:
        if isinstance(self.conn, H2Exchange):
            await self.conn.send(event)
            return
        self.buf += self.conn.send(event) or b""
        if isinstance(event, h11.EndOfMessage) or len(self.buf) >= COALESCE:
            await self.flush()

    async def flush(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            await self.stream.send(data)


async def copy_body(  # noqa: PLR0917
    conn: Any, stream: Stream, out: Writer, why: str, status: int = 400, flags: str = "DC"
) -> int:
    """Stream one message body from `conn` into `out` (sent whenever the source makes us
    wait); the bytes copied. A message that ends early: HttpError(status, flags, why)."""
    copied = 0
    while True:
        ev = await next_event_then(conn, stream, out)
        if isinstance(ev, h11.Data):
            copied += len(ev.data)
            await out.send(h11.Data(data=ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            await out.send(h11.EndOfMessage())
            return copied
        else:
            raise HttpError(status, flags, why)


async def next_event_then(conn: Any, stream: Stream, pending: Writer) -> Any:
    """`next_event`, flushing `pending` before it would block on the network."""
    if isinstance(conn, H2Exchange):
        await pending.flush()
        return await conn.next_event()
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        await pending.flush()
        try:
            data = await stream.receive()
        except HboneError:
            data = b""
        conn.receive_data(bytes(data))


def _key(service: Service | None) -> str:
    return f"{service.namespace}/{service.name}" if service else ""


def _str_headers(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


class WaypointServer:
    def __init__(self, cfg: WaypointConfig) -> None:
        self.cfg = cfg
        self.identity = SpiffeId(cfg.trust_domain, cfg.namespace, cfg.gateway)
        self.store = StateStore()
        self.registry = CollectorRegistry()
        guard.register(self.registry)
        self.admission = Admission()
        admission.register(self.admission, self.registry)
        self.certs = CertificateManager(CaEndpoint.of(cfg).request, registry=self.registry)
        self.metrics = RequestMetrics(self.registry)
        self.pool: HbonePool | None = None
        self.idle: dict[tuple[str, str, int], list[Upstream]] = defaultdict(list)
        self.rng = random.Random()
        self.admin = AdminService(self.config_dump, self.not_ready, self.registry)
        self.listening = False
        self._nursery: trio.Nursery | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._detectors: dict[str, OutlierDetector] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
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
            await nursery.start(self.certs.run)
            self.certs.set_identities({self.identity})
            await nursery.start(ManifestSource(cfg.state_dir).run, self.store)
            self.pool = HbonePool(nursery)
            self._nursery = nursery
            nursery.start_soon(self.pool.reap_idle)
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
            nursery.start_soon(serve, listener, self.inbound)
            self.listening = True
            log.info(
                "waypoint %s/%s up as %s on %s:%d",
                cfg.namespace,
                cfg.gateway,
                self.identity,
                *cfg.listen,
            )

        await run_until_signalled("waypoint", start)

    async def inbound(self, sock: socket.socket, peer: Any) -> None:
        peer_ip = peer[0]
        if not self.admission.take_handshake(peer_ip):
            log.warning("HBONE from %s refused: too many handshakes in progress", peer_ip)
            sock.close()
            return
        try:
            try:
                cred = await self.certs.get(self.identity, timeout=5)
            except NoCertificate as e:
                log.warning("HBONE from %s refused: %s", peer_ip, e)
                sock.close()
                return
            tls = TlsSocket(sock, cred.server_context, server_side=True)
            try:
                await tls.handshake()
                peer_id = verify_peer(tls.ssl, trust_domain=self.cfg.trust_domain)
            except (OSError, ssl.SSLError, trio.TooSlowError, PeerIdentityError) as e:
                log.info("HBONE handshake from %s failed: %s", peer_ip, e)
                tls.close()
                return
        finally:
            self.admission.drop_handshake(peer_ip)
        if not self.admission.take_tunnel(peer_ip, "waypoint"):
            log.warning("HBONE from %s (%s) refused: tunnel limit reached", peer_ip, peer_id)
            tls.close()
            return
        io = HboneIO(tls, HboneConnection(client=False), f"{peer_ip} ({peer_id})")
        io.on_request = lambda ev, conn: self._on_request(ev, conn, peer_id)
        try:
            await io.run()
        finally:
            self.admission.drop_tunnel(peer_ip, "waypoint")

    def destination(self, state: MeshState, target: tuple[str, int]) -> Destination | str:
        """What a CONNECT may reach through this waypoint, or why not: a Service VIP whose
        traffic this waypoint takes, or a pod bound to it (its own `use-waypoint`, or a
        Service of its that uses this waypoint). Anything else would let a client carry its
        traffic under the waypoint's identity past policies that target that Service."""
        me = (self.cfg.namespace, self.cfg.gateway)
        authority = f"{target[0]}:{target[1]}"
        hit = state.services_by_vip.get(target)
        if hit is not None:
            wp = state.service_waypoint(hit[0])
            if wp is None or (wp.namespace, wp.name) != me:
                return f"service {hit[0].namespace}/{hit[0].name} is not served by this waypoint"
            return Destination(authority, hit[0], target[1])
        w = state.workloads_by_ip.get(target[0])
        if w is None:
            return f"unknown destination {authority}"
        own = state.workload_waypoint(w)
        served = any(
            (wp := state.service_waypoint(s)) is not None and (wp.namespace, wp.name) == me
            for s in state.services_of(w)
        )
        if not served and (own is None or (own.namespace, own.name) != me):
            return f"pod {w.key} is not served by this waypoint"
        names = tuple(s.name for s in state.services_of(w) if s.namespace == self.cfg.namespace)
        return Destination(authority, None, target[1], w, names)

    def _on_request(self, ev: RequestReceived, io: HboneIO, peer: SpiffeId) -> None:
        req = check_request(ev)
        dest = (
            req.why
            if isinstance(req, BadRequest)
            else self.destination(self.store.current, req.target)
        )
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
            io.spawn(
                req.stream_id, self.serve_stream, stream, dest, peer, client[0] if client else ""
            )

    async def serve_stream(
        self, stream: Stream, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        try:
            await self._serve_stream(stream, dest, peer, client_ip)
        finally:
            self.admission.drop_stream()

    async def _serve_stream(
        self, stream: Stream, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        try:
            kind, first = await self._detect(stream)
            if kind == "http1":
                await self.http1(stream, http1.skip_empty_lines(first), dest, peer, client_ip)
            elif kind == "h2":
                await self.h2(stream, first, dest, peer, client_ip)
            else:
                await self.tcp(stream, first, dest, peer, client_ip)
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

    # -- upstreams -----------------------------------------------------------------------------

    def _endpoint(self, service: Service, port: int) -> tuple[Workload, int] | None:
        state = self.store.current
        sport = next((p for p in service.ports if p.port == port), None)
        if sport is None:
            return None
        endpoints = state.endpoints(service, sport)
        return self.rng.choice(endpoints) if endpoints else None

    async def _tunnel(self, w: Workload, port: int, client_ip: str, extra: list[Any]) -> Stream:
        """A CONNECT stream to a pod's 15008, expecting the pod's identity."""
        assert self.pool is not None and w.ip is not None
        expected = w.identity(self.cfg.trust_domain)
        cred = await self.certs.get(self.identity, timeout=5)

        async def dial() -> HboneIO:
            assert self.pool is not None and w.ip is not None
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    try:
                        sock.connect((w.ip, HBONE_PORT))
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connect to {w.ip}:{HBONE_PORT} failed")
            except BaseException:
                sock.close()
                raise
            return await self.pool.tunnel(sock, cred.client_context, expected)

        headers = [
            ("forwarded", f'for="{client_ip}"' if client_ip else f'for="{w.ip}"'),
            ("baggage", f"k8s.namespace.name={self.cfg.namespace},k8s.pod.name=waypoint"),
            *extra,
        ]
        return await self.pool.open_stream((w.ip, expected), dial, f"{w.ip}:{port}", headers)

    async def tcp(
        self, stream: Stream, first: bytes, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        """Not HTTP: a TCP relay to one ready pod of the destination, over HBONE, once the
        policies in scope allow it as TCP (`authorize_tcp`)."""
        denied = self.authorize_tcp(dest, client_ip, peer)
        if denied is not None:
            log.info("TCP from %s to %s denied: %s", peer, dest.authority, denied)
            self.metrics.tcp_denied.inc()
            stream.reset(ErrorCode.CONNECT_ERROR)
            return
        target = (
            (dest.workload, dest.port)
            if dest.workload is not None
            else (self._endpoint(dest.service, dest.port) if dest.service else None)
        )
        if target is None:
            log.info("TCP to %s: no ready endpoint", dest.authority)
            stream.reset()
            return
        try:
            up = await self._tunnel(target[0], target[1], client_ip, [])
        except (HboneError, OSError, ssl.SSLError, trio.TooSlowError, PeerIdentityError) as e:
            log.info("TCP to %s via %s failed: %s", dest.authority, target[0].key, e)
            stream.reset()
            return
        try:
            if first:
                await up.send(first)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, stream, up)
                nursery.start_soon(pipe, up, stream)
        finally:
            up.close()

    async def _upstream(
        self, w: Workload, port: int, client_ip: str, trace: str, svc: str = ""
    ) -> Upstream:
        assert w.ip is not None
        key = (svc, w.ip, port)
        while self.idle[key]:
            up = self.idle[key].pop()
            if up.stream.reset_code is None and not up.stream.eof:
                return up
            self._drop(up)
        stream = await self._tunnel(w, port, client_ip, [("traceparent", trace)])
        self._breaker(svc).connections += 1
        return Upstream(key, stream)

    def _release(self, up: Upstream) -> None:
        if up.reusable() and len(self.idle[up.key]) < MAX_IDLE_UPSTREAMS:
            up.conn.start_next_cycle()
            self.idle[up.key].append(up)
        else:
            self._drop(up)

    # -- HTTP/1.1 ------------------------------------------------------------------------------

    async def http1(
        self, stream: Stream, first: bytes, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        down = h11.Connection(h11.SERVER)
        down.receive_data(first)
        try:
            while True:
                ev = await self._request_head(down, stream)
                if not isinstance(ev, h11.Request):
                    break
                if not await self._one_request(down, stream, ev, dest, peer, client_ip):
                    stream.reset()
                    return
                if down.our_state is h11.MUST_CLOSE or down.their_state is h11.MUST_CLOSE:
                    break
                if down.their_state is not h11.DONE:
                    await self._drain_request(down, stream)
                try:
                    down.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except h11.RemoteProtocolError as e:
            # Not HTTP/1.1 we can frame with certainty (two Host headers, an oversized head,
            # ambiguous framing, bad chunking): answered 400 when no response has begun, and
            # the stream ends, so nothing after the doubt is read as a request.
            log.info("HTTP/1.1 from %s refused: %s", peer, e)
            if down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._local_reply(down, stream, 400, f"bad request: {e}")
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

    async def h2(
        self, stream: Stream, first: bytes, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        """HTTP/2 with prior knowledge: every request stream through the same logic."""

        async def one(ex: H2Exchange) -> None:
            if ex.request is None:
                await self._local_reply(ex, stream, 400, "bad HTTP/2 request head")
                return
            await self._one_request(ex, stream, ex.request, dest, peer, client_ip)

        await H2Server(stream, one).run(first)

    async def _one_request(  # noqa: PLR0917
        self,
        down: Any,
        stream: Stream,
        req: h11.Request,
        dest: Destination,
        peer: SpiffeId,
        client_ip: str,
    ) -> bool:
        """Serve one request and record it; False if the response broke off midway."""
        started = time.monotonic()
        rec = self._record(req, dest, peer, client_ip)
        ok = True
        try:
            try:
                req = self._normalized(req)
                rec.path = req.target.decode("latin-1")
                await self._exchange(down, stream, req, dest, rec, client_ip, peer)
            except h11.RemoteProtocolError as e:  # the client's body broke HTTP/1.1 framing
                raise HttpError(400, "DPE", f"bad request: {e}") from None
        except HttpError as e:
            rec.response_code, rec.response_flags, rec.error = e.status, e.flags, str(e)
            if down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._local_reply(down, stream, e.status, str(e))
            else:
                ok = False
        rec.duration_ms = (time.monotonic() - started) * 1000
        self.metrics.record(rec)
        return ok

    def _normalized(self, req: h11.Request) -> h11.Request:
        """The request with its target in the one spelling policies, routes and the backend
        all see (`waypoint.normalize`); an absolute-form target's authority becomes the Host
        (RFC 9112 3.2.2). An unusable target: HttpError 400."""
        raw = req.target.decode("latin-1")
        try:
            t = normalize.normalize_target(
                raw, self.cfg.path_normalization, req.method.decode("latin-1")
            )
        except BadTarget as e:
            raise HttpError(400, "DPE", f"bad request target: {e}") from None
        if t.authority is None and t.target == raw:
            return req
        headers = [(n, v) for n, v in req.headers if t.authority is None or n != b"host"]
        if t.authority is not None:
            headers.insert(0, (b"host", t.authority.encode("latin-1")))
        return h11.Request(method=req.method, target=t.target, headers=headers)

    def _record(
        self, req: h11.Request, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> RequestRecord:
        state = self.store.current
        src = state.workloads_by_ip.get(client_ip)
        return RequestRecord(
            method=req.method.decode(),
            path=req.target.decode("latin-1"),
            authority=dest.authority,
            source_workload=(src.owner or src.name) if src else "unknown",
            source_namespace=src.namespace if src else peer.namespace,
            source_principal=str(peer),
            destination_service=(
                f"{dest.service.name}.{dest.service.namespace}.svc.cluster.local"
                if dest.service
                else dest.authority
            ),
        )

    async def _exchange(  # noqa: PLR0917
        self,
        down: h11.Connection,
        stream: Stream,
        req: h11.Request,
        dest: Destination,
        rec: RequestRecord,
        client_ip: str,
        peer: SpiffeId,
    ) -> None:
        """One request: authorize, route, policy, then tries against backends until one
        answers."""
        headers = _str_headers(req.headers)
        facts = RequestFacts.of(rec.method, rec.path, headers)
        authn, who = self._authorize(dest, facts, client_ip, peer)
        if authn:
            headers, upstream_target = jwt.upstream_request(
                authn, who, headers, req.target.decode("latin-1")
            )
            req = h11.Request(method=req.method, target=upstream_target, headers=headers)
        hit, backend = self._route(dest, facts, rec, peer.namespace)
        rule = hit.rule if hit else None
        policy = self._traffic_policy(dest)
        route_policy = self._route_policy(hit)
        for p in (route_policy, policy):  # a route's own limits first, then the service's
            if p is not None:
                await self._apply_policy(p)
        if rule is not None and rule.redirect is not None:
            await self._redirect(down, stream, req, headers, hit, rec)
            return
        body = await self._read_body(down, stream, headers, rec)  # None: streamed, no replay
        out, target = self._forward_headers(headers, req, hit, rec)
        retry = (rule.retry if rule else None) or (policy.retry if policy else None)
        retry = retry or RetryPolicy(attempts=0)
        if rule is not None and body is not None:
            for ref in rule.mirrors:
                if self._granted(hit, ref):
                    self._mirror(ref, req.method, target, out, body, client_ip)
        timeout = rule.timeout if rule and rule.timeout else float("inf")
        resp: tuple[Upstream, Any] | None = None
        with trio.move_on_after(timeout):
            attempt = 0
            while resp is None:
                attempt += 1
                w, port = self._pick(backend, dest, policy, rec)
                status: int | None = None
                failure: _TryFailed | None = None
                try:
                    up, answer = await self._try(
                        w,
                        port,
                        req.method,
                        target,
                        out,
                        body,
                        down,
                        stream,
                        rule,
                        rec,
                        client_ip,
                        dest.service,
                        policy,
                    )
                    status = answer.status_code
                except _TryFailed as e:
                    up, answer, failure = None, None, e
                self._outlier(policy, f"{w.ip}:{port}", status)
                if (
                    answer is not None
                    and up is not None
                    and not (body is not None and retry.retries(attempt, status))
                ):
                    resp = (up, answer)
                    break
                if up is not None:  # a retryable answer: read it away, try again
                    await self._discard(up)
                if body is None or not retry.retries(attempt, status):
                    assert failure is not None
                    raise HttpError(
                        failure.status, failure.flags, f"upstream {rec.upstream}: {failure}"
                    )
                rec.retries += 1
                await trio.sleep(retry.delay(attempt, self.rng))
        if resp is None:
            raise HttpError(504, "UT", f"no response within {timeout:g}s (timeouts.request)")
        await self._respond(down, stream, resp[0], resp[1], rule, rec)

    def _decide(
        self, dest: Destination, client_ip: str, peer: SpiffeId, http: HttpFacts | None
    ) -> Decision:
        """The policies targeting this waypoint (Gateway) or the addressed Service; `http`
        None judges a stream as TCP: an ALLOW rule with HTTP fields matches nothing and a DENY
        rule with HTTP fields is applied without them (Istio's TCP filter chain)."""
        f = Facts(
            source_ip=client_ip or "0.0.0.0",
            destination_ip=dest.authority.rsplit(":", 1)[0],
            destination_port=dest.port,
            principal=peer.istio_principal,
            destination_namespace=self.cfg.namespace,
            http=http,
        )
        return decide(
            self.state().policies.policies.values(),
            f,
            at_waypoint(self.cfg.namespace, self.cfg.gateway, dest.services),
        )

    def authorize_tcp(self, dest: Destination, client_ip: str, peer: SpiffeId) -> str | None:
        """Why a non-HTTP stream is refused, or None if the policies allow it as TCP."""
        d = self._decide(dest, client_ip, peer, None)
        return None if d.allowed else f"RBAC: access denied ({d.policy or '-'}: {d.reason})"

    def _authorize(
        self, dest: Destination, facts: RequestFacts, client_ip: str, peer: SpiffeId
    ) -> tuple[list[jwt.RequestAuthentication], jwt.Authenticated | None]:
        """AuthorizationPolicies targeting this waypoint (Gateway) or the addressed Service,
        L7 fields included; the principal is the original client's (its agent's tunnel).
        Returns the RequestAuthentications in scope and who the token says the caller is."""
        authn = [
            p
            for p in self.state().request_authentications
            if p.applies(self.cfg.namespace, self.cfg.gateway, dest.services)
        ]
        try:
            who = jwt.authenticate(authn, facts.headers, facts.query) if authn else None
        except jwt.JwtError as e:
            raise HttpError(401, "UAEX", f"Jwt verification fails: {e}") from None
        host = facts.header("host") or dest.authority
        d = self._decide(
            dest,
            client_ip,
            peer,
            HttpFacts(
                facts.method,
                facts.path,
                normalize.normalize_authority(host),
                dict(facts.headers),
                who.principal if who else None,
                who.claims if who else {},
            ),
        )
        if not d.allowed:
            raise HttpError(403, "RBAC", f"RBAC: access denied ({d.policy or '-'}: {d.reason})")
        return authn, who

    def _route(
        self, dest: Destination, facts: RequestFacts, rec: RequestRecord, client_ns: str
    ) -> tuple[Selected | None, Service | None]:
        """The HTTPRoute rule (if any route applies to this client) and the backend Service
        it chose."""
        if dest.service is None:
            return None, None
        svc = dest.service
        attached = routes_for_client(
            self.state().routes, svc.namespace, svc.name, dest.port, client_ns
        )
        if not attached:
            return None, svc
        hit = select(attached, facts)
        if hit is None:
            raise HttpError(404, "NR", f"no HTTPRoute rule matches {rec.method} {rec.path}")
        rec.route = hit.route.key
        if hit.rule.redirect is not None:
            return hit, None
        ref = pick_backend(hit.rule, self.rng)
        if ref is None:
            raise HttpError(500, "NR", f"HTTPRoute {hit.route.key}: no backend with weight")
        if not self._granted(hit, ref):
            raise HttpError(
                500,
                "NR",
                f"HTTPRoute {hit.route.key}: backendRef {ref.namespace}/{ref.name} is in "
                "another namespace and no ReferenceGrant there permits it",
            )
        backend = self._service(ref.namespace, ref.name)
        if backend is None:
            raise HttpError(500, "NR", f"backend Service {ref.namespace}/{ref.name} is unknown")
        return hit, backend

    def _granted(self, hit: Selected | None, ref: BackendRef) -> bool:
        assert hit is not None
        return reference_granted(
            self.store.current.reference_grants, hit.route.namespace, ref.namespace, ref.name
        )

    def _service(self, namespace: str, name: str) -> Service | None:
        return next(
            (s for s in self.store.current.services if s.namespace == namespace and s.name == name),
            None,
        )

    def _pick(
        self,
        backend: Service | None,
        dest: Destination,
        policy: TrafficPolicy | None,
        rec: RequestRecord,
    ) -> tuple[Workload, int]:
        if backend is None:
            if dest.workload is None:
                raise HttpError(503, "UH", f"no ready endpoint for {dest.authority}")
            return dest.workload, dest.port
        port = self._backend_port(backend, dest)
        sport = next((p for p in backend.ports if p.port == port), None)
        endpoints = self.store.current.endpoints(backend, sport) if sport else []
        if policy is not None and policy.outlier is not None:
            now = time.monotonic()
            detector = self._outliers(policy)
            healthy = [e for e in endpoints if not detector.ejected(f"{e[0].ip}:{e[1]}", now)]
            endpoints = healthy or endpoints  # all ejected: better some than none (Envoy's panic)
        if not endpoints:
            raise HttpError(503, "UH", f"no ready endpoint for {backend.namespace}/{backend.name}")
        w, target_port = self.rng.choice(endpoints)
        rec.destination_workload = w.owner or w.name
        rec.destination_namespace = w.namespace
        rec.destination_principal = str(w.identity(self.cfg.trust_domain))
        rec.upstream = f"{w.ip}:{target_port}"
        return w, target_port

    def _backend_port(self, backend: Service, dest: Destination) -> int:
        for r in self.state().routes:
            for rule in r.rules:
                for ref in rule.backends:
                    if (ref.namespace, ref.name) == (backend.namespace, backend.name):
                        return ref.port
        return dest.port

    def _forward_headers(
        self,
        headers: list[tuple[str, str]],
        req: h11.Request,
        hit: Selected | None,
        rec: RequestRecord,
    ) -> tuple[list[tuple[str, str]], bytes]:
        """What goes upstream: end-to-end headers, new trace span, the rule's modifications."""
        trace = http1.child_traceparent(headers)
        rec.traceparent = trace
        out = [(n, v) for n, v in http1.end_to_end(headers) if n.lower() != "traceparent"]
        out.append(("traceparent", trace))
        if http1.is_chunked(headers):  # streamed as it comes, re-chunked by h11
            out.append(("transfer-encoding", "chunked"))
        target = req.target
        if hit is not None:
            rule = hit.rule
            if rule.request_headers is not None:
                out = rule.request_headers.apply(out)
            if rule.rewrite is not None:
                if rule.rewrite.hostname:
                    out = [(n, v) for n, v in out if n.lower() != "host"]
                    out.insert(0, ("host", rule.rewrite.hostname))
                if rule.rewrite.path is not None:
                    path, sep, query = req.target.decode("latin-1").partition("?")
                    new = replace_path(path, rule.rewrite.path, hit.match)
                    target = (new + sep + query).encode("latin-1")
        return out, target

    async def _read_body(
        self,
        down: h11.Connection,
        stream: Stream,
        headers: list[tuple[str, str]],
        rec: RequestRecord,
    ) -> bytes | None:
        """The request body if it is small enough to replay for retries and mirrors; None
        (nothing read yet) when it is larger or of unknown length: it is then streamed."""
        length = _content_length(headers)
        if length is None or length > REPLAY_LIMIT:
            return None
        chunks = []
        while True:
            ev = await next_event(down, stream)
            if isinstance(ev, h11.Data):
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise HttpError(400, "DC", "the client went away during the request")
        body = b"".join(chunks)
        rec.request_bytes = len(body)
        return body

    async def _try(  # noqa: PLR0917
        self,
        w: Workload,
        port: int,
        method: bytes,
        target: bytes,
        headers: list[tuple[str, str]],
        body: bytes | None,
        down: h11.Connection,
        stream: Stream,
        rule: Rule | None,
        rec: RequestRecord,
        client_ip: str,
        dest_service: Service | None,
        policy: TrafficPolicy | None,
    ) -> tuple[Upstream, Any]:
        """Send the request to one pod and wait for its response head."""
        svc = _key(dest_service)
        breaker = self._breaker(svc, policy)
        if not breaker.admit():
            raise HttpError(503, "UO", f"circuit breaker open for {w.key} (max requests)")
        try:
            if not self.idle.get((svc, w.ip or "", port)) and not breaker.may_connect():
                raise HttpError(503, "UO", f"circuit breaker open for {w.key} (max connections)")
            try:
                breaker.pending += 1
                up = await self._upstream(w, port, client_ip, rec.traceparent, svc)
            except (HboneError, OSError, ssl.SSLError, trio.TooSlowError, PeerIdentityError) as e:
                raise _TryFailed(f"connect: {e}") from None
            finally:
                breaker.pending -= 1
            out = list(headers)
            if body is not None:
                out = [(n, v) for n, v in out if n.lower() != "content-length"]
                out.append(("content-length", str(len(body))))
            try:
                w_up = Writer(up.conn, up.stream)
                await w_up.send(h11.Request(method=method, target=target, headers=out))
                if body is not None:
                    if body:
                        await w_up.send(h11.Data(data=body))
                    await w_up.send(h11.EndOfMessage())
                else:
                    await self._stream_body(down, stream, w_up, rec)
                limit = rule.backend_timeout if rule and rule.backend_timeout else float("inf")
                with trio.fail_after(limit):
                    answer = await next_event(up.conn, up.stream)
                    while isinstance(answer, h11.InformationalResponse):
                        answer = await next_event(up.conn, up.stream)
            except trio.TooSlowError:
                self._drop(up)
                raise _TryFailed(
                    f"no response within {limit:g}s (timeouts.backendRequest)", 504, "UT"
                ) from None
            except (h11.ProtocolError, HboneError) as e:
                self._drop(up)
                raise _TryFailed(str(e)) from None
            if not isinstance(answer, h11.Response):
                self._drop(up)
                raise _TryFailed("closed without a response")
            return up, answer
        finally:
            breaker.done()

    async def _stream_body(
        self, down: h11.Connection, stream: Stream, out: Writer, rec: RequestRecord
    ) -> None:
        rec.request_bytes += await copy_body(down, stream, out, "the client went away")

    async def _respond(  # noqa: PLR0917
        self,
        down: h11.Connection,
        stream: Stream,
        up: Upstream,
        resp: Any,
        rule: Rule | None,
        rec: RequestRecord,
    ) -> None:
        rheaders = http1.end_to_end(_str_headers(resp.headers))
        if rule is not None and rule.response_headers is not None:
            rheaders = rule.response_headers.apply(rheaders)
        try:
            out = Writer(down, stream)
            await out.send(
                h11.Response(status_code=resp.status_code, headers=rheaders, reason=resp.reason)
            )
            rec.response_code = resp.status_code
            rec.response_bytes += await copy_body(
                up.conn, up.stream, out, f"upstream {rec.upstream} ended mid-response", 502, "UC"
            )
        except (h11.ProtocolError, HboneError) as e:
            self._drop(up)
            raise HttpError(502, "UPE", f"upstream {rec.upstream}: {e}") from None
        except BaseException:
            self._drop(up)
            raise
        self._release(up)

    async def _discard(self, up: Upstream) -> None:
        try:
            while not isinstance(
                await next_event(up.conn, up.stream), h11.EndOfMessage | h11.ConnectionClosed
            ):
                pass
        except (h11.ProtocolError, HboneError):
            self._drop(up)
            return
        self._release(up)

    def _drop(self, up: Upstream) -> None:
        up.stream.reset()
        up.stream.close()
        self._breaker(up.key[0]).connections -= 1

    async def _redirect(  # noqa: PLR0917
        self,
        down: h11.Connection,
        stream: Stream,
        req: h11.Request,
        headers: list[tuple[str, str]],
        hit: Selected | None,
        rec: RequestRecord,
    ) -> None:
        assert hit is not None and hit.rule.redirect is not None
        r = hit.rule.redirect
        host = {n.lower(): v for n, v in headers}.get("host", "").split(":")[0]
        path, sep, query = req.target.decode("latin-1").partition("?")
        if r.path is not None:
            path = replace_path(path, r.path, hit.match)
        port = f":{r.port}" if r.port else ""
        location = f"{r.scheme or 'http'}://{r.hostname or host}{port}{path}{sep}{query}"
        await self._drain_request(down, stream)
        await send(
            down,
            stream,
            h11.Response(
                status_code=r.status, headers=[("location", location), ("content-length", "0")]
            ),
        )
        await send(down, stream, h11.EndOfMessage())
        rec.response_code = r.status

    def _mirror(  # noqa: PLR0917
        self,
        ref: BackendRef,
        method: bytes,
        target: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
        client_ip: str,
    ) -> None:
        """Send a copy to the mirror backend and forget the answer (never slows the original)."""
        svc = self._service(ref.namespace, ref.name)
        sport = next((p for p in svc.ports if p.port == ref.port), None) if svc else None
        endpoints = self.store.current.endpoints(svc, sport) if svc and sport else []
        if not endpoints or self._nursery is None:
            return
        w, port = self.rng.choice(endpoints)

        async def shadow() -> None:
            with trio.move_on_after(10):
                try:
                    up = await self._upstream(w, port, client_ip, http1.child_traceparent(headers))
                    out = [(n, v) for n, v in headers if n.lower() != "content-length"]
                    out.append(("content-length", str(len(body))))
                    await send(
                        up.conn, up.stream, h11.Request(method=method, target=target, headers=out)
                    )
                    if body:
                        await send(up.conn, up.stream, h11.Data(data=body))
                    await send(up.conn, up.stream, h11.EndOfMessage())
                    answer = await next_event(up.conn, up.stream)
                    if isinstance(answer, h11.Response):
                        code = str(answer.status_code)
                        await self._discard(up)
                    else:
                        code = "error"
                        self._drop(up)
                except (
                    HboneError,
                    OSError,
                    ssl.SSLError,
                    h11.ProtocolError,
                    PeerIdentityError,
                ) as e:
                    log.debug("mirror to %s failed: %s", w.key, e)
                    code = "error"
                self.metrics.mirrored.labels(f"{ref.namespace}/{ref.name}", code).inc()

        self._nursery.start_soon(shadow)

    # -- traffic policy (TrafficPolicy CRD) ----------------------------------------------------

    def _traffic_policy(self, dest: Destination) -> TrafficPolicy | None:
        if dest.service is None:
            return None
        return self.state().traffic_policy("Service", dest.service.namespace, dest.service.name)

    def _route_policy(self, hit: Selected | None) -> TrafficPolicy | None:
        """A TrafficPolicy targeting the HTTPRoute that matched (per-route rate limits)."""
        if hit is None:
            return None
        return self.state().traffic_policy("HTTPRoute", hit.route.namespace, hit.route.name)

    async def _apply_policy(self, policy: TrafficPolicy) -> None:
        if policy.rate is not None:
            bucket = self._buckets.get(policy.key)
            if bucket is None or (bucket.rate, bucket.burst) != policy.rate:
                bucket = self._buckets[policy.key] = TokenBucket(*policy.rate)
            if not bucket.take(time.monotonic()):
                raise HttpError(429, "RL", f"rate limited by {KIND} {policy.key}")
        if policy.fault is not None:
            wait, abort = policy.fault.decide(self.rng)
            if wait:
                await trio.sleep(wait)
            if abort is not None:
                raise HttpError(abort, "FI", f"fault injected by {KIND} {policy.key}")

    def _outliers(self, policy: TrafficPolicy) -> OutlierDetector:
        assert policy.outlier is not None
        d = self._detectors.get(policy.key)
        if d is None or (d.consecutive, d.ejection_time) != policy.outlier:
            d = self._detectors[policy.key] = OutlierDetector(*policy.outlier)
        return d

    def _outlier(self, policy: TrafficPolicy | None, endpoint: str, status: int | None) -> None:
        if policy is not None and policy.outlier is not None:
            self._outliers(policy).record(endpoint, status, time.monotonic())

    def _breaker(self, svc: str, policy: TrafficPolicy | None = None) -> CircuitBreaker:
        """The circuit breaker of an addressed Service (like an Envoy cluster's), with the
        limits of its TrafficPolicy when one is given."""
        cb = self._breakers.get(svc)
        if cb is None:
            cb = self._breakers[svc] = CircuitBreaker(PoolLimits())
        if policy is not None:
            cb.limits = policy.pool or PoolLimits()
        return cb

    async def _local_reply(self, down: Any, stream: Stream, status: int, why: str) -> None:
        """A response of the waypoint's own; if the client is gone, its stream is reset (an
        HTTP/2 exchange resets only its own HTTP/2 stream, never the connection's)."""
        body = f"{why}\n".encode()
        try:
            await send(
                down,
                stream,
                h11.Response(
                    status_code=status,
                    headers=[("content-type", "text/plain"), ("content-length", str(len(body)))],
                ),
            )
            await send(down, stream, h11.Data(data=body))
            await send(down, stream, h11.EndOfMessage())
        except (h11.ProtocolError, HboneError):
            if not isinstance(down, H2Exchange):
                stream.reset()

    async def _drain_request(self, down: h11.Connection, stream: Stream) -> None:
        """Read the rest of a request we answered early, so the connection can go on."""
        while down.their_state is h11.SEND_BODY:
            ev = await next_event(down, stream)
            if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                break


async def pipe(src: Stream, dst: Stream) -> None:
    """Copy one HBONE stream into another until end of stream (then half-close) or reset."""
    try:
        while True:
            data = await src.receive()
            if not data:
                await dst.send_eof()
                return
            await dst.send(data)
    except HboneError:
        dst.reset()
        src.reset()
