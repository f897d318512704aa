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

import h2.events
import h11
import trio
from prometheus_client import CollectorRegistry

from agent import http
from agent.capture.rules import HBONE_PORT
from agent.config import CA_SERVER_NAME
from agent.hbone.conn import BadRequest, HboneConnection, check_request
from agent.hbone.io import HboneError, HboneIO, Stream, TlsSocket
from agent.hbone.pool import HbonePool
from agent.identity.ca_client import CaEndpoint
from agent.identity.manager import CertificateManager, NoCertificate
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from agent.identity.tls import PeerIdentityError, verify_peer
from agent.lifecycle import run_until_signalled
from agent.state.model import MeshState, Service, Workload
from agent.state.sources.manifests import ManifestSource
from agent.state.store import StateStore
from agent.telemetry.admin import AdminService
from waypoint import http1
from waypoint.routes import HttpRoute, RequestFacts, parse_routes, pick_backend, select
from waypoint.telemetry import RequestMetrics, RequestRecord

log = logging.getLogger("veil.waypoint")
CONNECT_TIMEOUT = 5.0
MAX_IDLE_UPSTREAMS = 16


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
    metrics_listen: tuple[str, int] = ("0.0.0.0", 15020)
    ready_listen: tuple[str, int] = ("0.0.0.0", 15021)


@dataclass(frozen=True)
class Destination:
    """What a CONNECT addressed: a service port (VIP) or one pod."""

    authority: str
    service: Service | None
    port: int
    workload: Workload | None = None


@dataclass
class Upstream:
    """An HTTP/1.1 client connection to one pod, over one HBONE stream."""

    key: tuple[str, int]
    stream: Stream
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


class HttpError(Exception):
    def __init__(self, status: int, flags: str, why: str) -> None:
        super().__init__(why)
        self.status, self.flags = status, flags


async def next_event(conn: h11.Connection, stream: Stream) -> Any:
    """The next h11 event, feeding it stream bytes as it needs them."""
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        try:
            data = await stream.receive()
        except HboneError:
            data = b""
        conn.receive_data(bytes(data))


async def send(conn: h11.Connection, stream: Stream, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send(data)


def _str_headers(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


class WaypointServer:
    def __init__(self, cfg: WaypointConfig) -> None:
        self.cfg = cfg
        self.identity = SpiffeId(cfg.trust_domain, cfg.namespace, cfg.gateway)
        self.store = StateStore()
        ca = CaEndpoint(
            host=cfg.ca_address[0],
            port=cfg.ca_address[1],
            server_name=cfg.ca_server_name,
            root_file=cfg.ca_root,
            token_file=cfg.token_file,
        )
        self.registry = CollectorRegistry()
        self.certs = CertificateManager(ca.request, registry=self.registry)
        self.metrics = RequestMetrics(self.registry)
        self.pool: HbonePool | None = None
        self.idle: dict[tuple[str, int], list[Upstream]] = defaultdict(list)
        self._routes: tuple[int, list[HttpRoute]] = (-1, [])
        self.rng = random.Random()
        self.admin = AdminService(self.config_dump, self.not_ready, self.registry)
        self.listening = False

    # -- state ---------------------------------------------------------------------------------

    def routes(self) -> list[HttpRoute]:
        """The HTTPRoutes in force (parsed once per snapshot; invalid ones are logged)."""
        state = self.store.current
        if self._routes[0] != state.version:
            routes, errors = parse_routes(state.others)
            for e in errors:
                log.error("%s", e)
            self._routes = (state.version, routes)
        return self._routes[1]

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
            "routes": [r.key for r in self.routes()],
            "certificates": self.certs.snapshot(),
        }

    # -- serving -------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg

        async def start(nursery: trio.Nursery) -> None:
            await nursery.start(self.certs.run)
            self.certs.set_identities({self.identity})
            await nursery.start(ManifestSource(cfg.state_dir).run, self.store)
            self.pool = HbonePool(nursery)
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
            listener.bind(cfg.listen)
            listener.listen(1024)
            from agent.proxy.pod import serve  # noqa: PLC0415 - the agent's accept loop

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

    async def inbound(self, sock: socket.socket) -> None:
        peer_ip = sock.getpeername()[0]
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
        io = HboneIO(tls, HboneConnection(client=False), f"{peer_ip} ({peer_id})")
        io.on_request = lambda ev, conn: self._on_request(ev, conn, peer_id)
        await io.run()

    def _destination(self, state: MeshState, target: tuple[str, int]) -> Destination | None:
        authority = f"{target[0]}:{target[1]}"
        hit = state.services_by_vip.get(target)
        if hit is not None:
            return Destination(authority, hit[0], target[1])
        w = state.workloads_by_ip.get(target[0])
        if w is not None:
            return Destination(authority, None, target[1], w)
        return None

    def _on_request(self, ev: h2.events.RequestReceived, io: HboneIO, peer: SpiffeId) -> None:
        req = check_request(ev)
        dest = (
            None
            if isinstance(req, BadRequest)
            else self._destination(self.store.current, req.target)
        )
        if isinstance(req, BadRequest) or dest is None:
            why = req.why if isinstance(req, BadRequest) else f"unknown destination {req.target}"
            log.info("HBONE from %s: 400, %s", peer, why)
            io.conn.respond(req.stream_id, 400, end_stream=True)
            io.queue_output()
            if (stream := io.streams.get(req.stream_id)) is not None:
                stream.close()
            return
        io.conn.respond(req.stream_id, 200)
        io.queue_output()
        stream = io.streams.get(req.stream_id)
        if stream is not None:
            client = req.forwarded_for
            io.spawn(self.serve_stream, stream, dest, peer, client[0] if client else "")

    async def serve_stream(
        self, stream: Stream, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        try:
            first = await stream.receive()
        except HboneError:
            stream.close()
            return
        try:
            if http1.detect(bytes(first[:24])) == "http1":
                await self.http1(stream, bytes(first), dest, peer, client_ip)
            else:
                await self.tcp(stream, bytes(first), dest, client_ip)
        finally:
            stream.close()

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
                tls = TlsSocket(sock, cred.client_context, server_side=False)
                await tls.handshake()
                verify_peer(tls.ssl, expected={expected})
            except BaseException:
                sock.close()
                raise
            io = HboneIO(tls, HboneConnection(client=True), f"{w.ip}:{HBONE_PORT}")
            await self.pool.start_conn(io)
            return io

        headers = [
            ("forwarded", f'for="{client_ip}"' if client_ip else f'for="{w.ip}"'),
            ("baggage", f"k8s.namespace.name={self.cfg.namespace},k8s.pod.name=waypoint"),
            *extra,
        ]
        return await self.pool.open_stream((w.ip, expected), dial, f"{w.ip}:{port}", headers)

    async def tcp(self, stream: Stream, first: bytes, dest: Destination, client_ip: str) -> None:
        """Not HTTP: a TCP relay to one ready pod of the destination, over HBONE."""
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

    async def _upstream(self, w: Workload, port: int, client_ip: str, trace: str) -> Upstream:
        assert w.ip is not None
        key = (w.ip, port)
        while self.idle[key]:
            up = self.idle[key].pop()
            if up.stream.reset_code is None and not up.stream.eof:
                return up
            up.stream.close()
        stream = await self._tunnel(w, port, client_ip, [("traceparent", trace)])
        return Upstream(key, stream)

    def _release(self, up: Upstream) -> None:
        if up.reusable() and len(self.idle[up.key]) < MAX_IDLE_UPSTREAMS:
            up.conn.start_next_cycle()
            self.idle[up.key].append(up)
        else:
            up.stream.reset()
            up.stream.close()

    # -- HTTP/1.1 ------------------------------------------------------------------------------

    async def http1(
        self, stream: Stream, first: bytes, dest: Destination, peer: SpiffeId, client_ip: str
    ) -> None:
        down = h11.Connection(h11.SERVER)
        down.receive_data(first)
        while True:
            ev = await next_event(down, stream)
            if not isinstance(ev, h11.Request):
                break
            started = time.monotonic()
            rec = self._record(ev, dest, peer, client_ip)
            try:
                await self._exchange(down, stream, ev, dest, rec, client_ip)
            except HttpError as e:
                rec.response_code, rec.response_flags, rec.error = e.status, e.flags, str(e)
                if down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._local_reply(down, stream, e.status, str(e))
                else:
                    stream.reset()
                    rec.duration_ms = (time.monotonic() - started) * 1000
                    self.metrics.record(rec)
                    return
            rec.duration_ms = (time.monotonic() - started) * 1000
            self.metrics.record(rec)
            if down.our_state is h11.MUST_CLOSE or down.their_state is h11.MUST_CLOSE:
                break
            if down.their_state is not h11.DONE:
                await self._drain_request(down, stream)
            try:
                down.start_next_cycle()
            except h11.LocalProtocolError:
                break
        await stream.send_eof()

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
    ) -> None:
        headers = _str_headers(req.headers)
        facts = RequestFacts.of(rec.method, rec.path, headers)
        request_mod = response_mod = None
        if dest.service is not None:
            svc = dest.service
            attached = [
                r for r in self.routes() if r.attaches_to(svc.namespace, svc.name, dest.port)
            ]
            if attached:
                hit = select(attached, facts)
                if hit is None:
                    raise HttpError(404, "NR", f"no HTTPRoute rule matches {rec.method} {rec.path}")
                route, rule = hit
                rec.route = route.key
                request_mod, response_mod = rule.request_headers, rule.response_headers
                ref = pick_backend(rule, self.rng)
                if ref is None:
                    raise HttpError(500, "NR", f"HTTPRoute {route.key}: no backend with weight")
                backend = next(
                    (
                        s
                        for s in self.store.current.services
                        if s.namespace == ref.namespace and s.name == ref.name
                    ),
                    None,
                )
                if backend is None:
                    raise HttpError(
                        500, "NR", f"backend Service {ref.namespace}/{ref.name} is unknown"
                    )
                target = self._endpoint(backend, ref.port)
            else:
                target = self._endpoint(svc, dest.port)
        else:
            target = (dest.workload, dest.port) if dest.workload else None
        if target is None:
            raise HttpError(503, "UH", f"no ready endpoint for {dest.authority}")
        w, port = target
        rec.destination_workload = w.owner or w.name
        rec.destination_namespace = w.namespace
        rec.destination_principal = str(w.identity(self.cfg.trust_domain))
        rec.upstream = f"{w.ip}:{port}"
        trace = http1.child_traceparent(headers)
        rec.traceparent = trace
        out = http1.end_to_end(headers)
        out = [(n, v) for n, v in out if n.lower() != "traceparent"] + [("traceparent", trace)]
        if request_mod is not None:
            out = request_mod.apply(out)
        if http1.is_chunked(headers):
            out.append(("transfer-encoding", "chunked"))
        try:
            up = await self._upstream(w, port, client_ip, trace)
        except (HboneError, OSError, ssl.SSLError, trio.TooSlowError, PeerIdentityError) as e:
            raise HttpError(503, "UF", f"upstream {rec.upstream}: {e}") from None
        try:
            await send(
                up.conn, up.stream, h11.Request(method=req.method, target=req.target, headers=out)
            )
            while True:  # the request body, streamed
                ev = await next_event(down, stream)
                if isinstance(ev, h11.Data):
                    rec.request_bytes += len(ev.data)
                    await send(up.conn, up.stream, h11.Data(data=ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    await send(up.conn, up.stream, h11.EndOfMessage())
                    break
                else:
                    raise HttpError(400, "DC", "the client went away during the request")
            resp = await next_event(up.conn, up.stream)
            while isinstance(resp, h11.InformationalResponse):
                resp = await next_event(up.conn, up.stream)
            if not isinstance(resp, h11.Response):
                raise HttpError(503, "UC", f"upstream {rec.upstream} closed without a response")
            rheaders = http1.end_to_end(_str_headers(resp.headers))
            if response_mod is not None:
                rheaders = response_mod.apply(rheaders)
            await send(
                down,
                stream,
                h11.Response(status_code=resp.status_code, headers=rheaders, reason=resp.reason),
            )
            rec.response_code = resp.status_code
            while True:  # the response body, streamed
                ev = await next_event(up.conn, up.stream)
                if isinstance(ev, h11.Data):
                    rec.response_bytes += len(ev.data)
                    await send(down, stream, h11.Data(data=ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    await send(down, stream, h11.EndOfMessage())
                    break
                else:
                    raise HttpError(502, "UC", f"upstream {rec.upstream} ended mid-response")
        except (h11.ProtocolError, HboneError) as e:
            up.stream.reset()
            up.stream.close()
            raise HttpError(502, "UPE", f"upstream {rec.upstream}: {e}") from None
        except BaseException:
            up.stream.reset()
            up.stream.close()
            raise
        self._release(up)

    async def _local_reply(
        self, down: h11.Connection, stream: Stream, status: int, why: str
    ) -> None:
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
