"""One enrolled pod's proxy: listeners inside its netns and the three roles behind them.

    127.0.0.1:15001  outbound: the app's captured connections (original destination from
                     SO_ORIGINAL_DST) -> route() -> HBONE (pooled), passthrough or refusal
    0.0.0.0:15006    inbound plaintext from clients outside the mesh -> the app
    <pod IP>:15008   inbound HBONE: mTLS (client must be of our trust domain), CONNECT to
                     this pod only -> the app, spoofing the client's address

Every failure closes the app's connection (with a reset where TCP allows): traffic is never
sent on in plaintext when the mesh path fails. Resource handling: everything runs in the
nursery `run()` opens; cancelling it closes listeners, tunnels and relays.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import Counter

from veil.agent.capture.netns import NetNs, connect, listen, original_dst
from veil.agent.proxy.copy import Transferred, abort, relay_stream, relay_tcp
from veil.agent.proxy.inbound import PodFacts, Verdict, admit_connect, admit_plaintext, judge
from veil.agent.proxy.outbound import Kind, Route, route
from veil.core.admission import Admission
from veil.core.authz import Decision
from veil.core.hbone import ConnectRequest, RequestReceived, check_request
from veil.core.ports import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT
from veil.core.spiffe import SpiffeId
from veil.core.state import MeshState, Service, Workload
from veil.runtime.hbone.io import HboneError, HboneIO
from veil.runtime.hbone.pool import HbonePool
from veil.runtime.hbone.server import HboneServer
from veil.runtime.identity.manager import CertificateManager, NoCertificate
from veil.runtime.identity.tls import PeerIdentityError
from veil.runtime.listener import serve
from veil.runtime.store import StateStore
from veil.runtime.telemetry.metrics import Connection, TcpMetrics

log = logging.getLogger("veil.proxy")
CERT_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
EXPIRY_GRACE = 30.0  # seconds a server still takes streams on a tunnel past its certificates


@dataclass
class ProxyContext:
    """What every pod proxy of an agent shares."""

    node: str
    trust_domain: str
    store: StateStore
    certs: CertificateManager
    cert_timeout: float = CERT_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    metrics: TcpMetrics | None = None
    denied: Counter | None = None
    admission: Admission = field(default_factory=Admission)

    def count_denial(self, w: Workload, source: str, port: int, d: Decision) -> None:
        """Log and count a connection an AuthorizationPolicy denied."""
        log.info(
            "denied %s -> %s:%d: policy %s: %s", source, w.key, port, d.policy or "-", d.reason
        )
        if self.denied is not None:
            self.denied.labels(policy=d.policy or "none").inc()

    def report(self, c: Connection, moved: Transferred | None = None) -> None:
        """Count a connection that ended (or never started) and write its access log line."""
        if moved is not None:
            c.sent, c.received = moved.up, moved.down
        if self.metrics is not None:
            self.metrics.record(c)


@dataclass(eq=False)
class _Live:
    """An inbound connection in progress, as its admission judged it: judged again whenever
    the policies change (`PodProxy.reevaluate`), and cut if they now deny it."""

    scope: trio.CancelScope
    peer: SpiffeId | None
    peer_ip: str
    port: int
    denied: Verdict | None = None


@dataclass
class _PodView:
    """One snapshot's answers for one pod (see `PodProxy._view`)."""

    state: MeshState
    pod: PodFacts  # what inbound decisions need: the pod as this snapshot has it
    services: dict[str, Service | None] = field(default_factory=dict)  # by baggage


_trace_ids = random.Random(secrets.randbits(64))  # trace ids need uniqueness, not secrecy


def traceparent() -> str:
    """A new W3C trace context (a root span) for the tunnelled connection."""
    return f"00-{_trace_ids.getrandbits(128):032x}-{_trace_ids.getrandbits(64):016x}-01"


class PodProxy:
    def __init__(self, ctx: ProxyContext, workload: Workload, netns_path: str, ip: str) -> None:
        self.ctx, self.workload, self.netns_path, self.ip = ctx, workload, netns_path, ip
        self.identity = workload.identity(ctx.trust_domain)
        self.ns: NetNs | None = None
        self.pool: HbonePool | None = None
        self.hbone = HboneServer(
            ctx.certs,
            self.identity,
            ctx.trust_domain,
            ctx.admission,
            scope=ip,
            name=workload.key,
            on_request=self._on_request,
            cert_timeout=ctx.cert_timeout,
            expiry_grace=EXPIRY_GRACE,
        )
        self._pod_view: _PodView | None = None
        self.live: set[_Live] = set()  # inbound connections relaying now

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ns = self.ns = NetNs(self.netns_path)
        socks: list[socket.socket] = []
        try:
            for address in (
                ("127.0.0.1", OUTBOUND_PORT),
                ("0.0.0.0", INBOUND_PLAIN_PORT),
                (self.ip, HBONE_PORT),
            ):
                socks.append(listen(ns, address))
            async with trio.open_nursery() as nursery:
                self.pool = HbonePool(nursery)
                nursery.start_soon(self.pool.reap_idle)
                for sock, handler in zip(
                    socks, (self.outbound, self.inbound_plain, self.hbone.handle), strict=True
                ):
                    nursery.start_soon(serve, sock, handler)
                socks = []  # owned by the listeners now
                task_status.started()
        finally:
            for s in socks:
                s.close()
            ns.close()

    # -- 15001 -----------------------------------------------------------------------------

    async def outbound(self, client: socket.socket, peer: Any) -> None:
        assert self.ns is not None and self.pool is not None
        try:
            dst = original_dst(client)
        except OSError as e:
            # Not a redirected connection (an app dialling 127.0.0.1:15001 itself), or its
            # record is gone: nowhere known to send it.
            log.info(
                "outbound %s from port %d refused: no original destination (%s)",
                self.workload.key,
                peer[1],
                e.strerror,
            )
            abort(client)
            return
        r = route(self.ctx.store.current, self.workload, dst, self.ctx.trust_domain)
        # Only this pod reaches its 127.0.0.1:15001, from its own IP (iptables mode) or from
        # 127.0.0.1 (eBPF mode, where the connect was rewritten before a source was chosen):
        # the client is the pod's IP either way.
        peer = (self.ip, peer[1])
        c = Connection(
            "source",
            "hbone" if r.kind is Kind.HBONE else "passthrough",
            f"{peer[0]}:{peer[1]}",
            f"{r.address[0]}:{dst[1]}",
            source=self.workload,
            source_principal=str(self.identity),
            destination=r.workload,
            destination_principal=str(r.identity) if r.identity else "unknown",
            service=r.service,
            trust_domain=self.ctx.trust_domain,
        )
        if r.kind is Kind.REJECT:
            log.info("outbound %s -> %s:%d refused: %s", self.workload.key, *dst, r.reason)
            abort(client)
            c.response_flags, c.error = "UH", r.reason
            self.ctx.report(c)
            return
        if r.kind is Kind.PASSTHROUGH:
            try:
                upstream = await connect(self.ns, r.address, self.ctx.connect_timeout)
            except (OSError, trio.TooSlowError) as e:
                log.info("passthrough %s -> %s:%d failed: %s", self.workload.key, *r.address, e)
                abort(client)
                c.response_flags, c.error = "UF", str(e)
                self.ctx.report(c)
                return
            self.ctx.report(c, await relay_tcp(client, upstream))
            return
        try:
            cred = await self.ctx.certs.get(self.identity, timeout=self.ctx.cert_timeout)
            stream = await self.pool.open_stream(
                (r.address, r.identity),
                lambda: self._dial(r, cred.client_context, cred.not_after),
                r.authority,
                self._headers(peer, r),
                wait_response=False,  # the app's first bytes follow the CONNECT at once
            )
        except (
            NoCertificate,
            HboneError,
            PeerIdentityError,
            OSError,
            ssl.SSLError,
            trio.TooSlowError,
        ) as e:
            self._refused(c, r, e)
            abort(client)
            return
        moved = await relay_stream(client, stream, answers=False)
        if stream.status is None or not 200 <= stream.status < 300:
            # Refused (the relay reset the app's connection) or reset before any answer.
            why = (
                f"{stream.io.peer} answered {stream.status} to CONNECT {r.authority}"
                if stream.status is not None
                else f"stream reset by {stream.io.peer} before an answer (code {stream.reset_code})"
            )
            self._refused(c, r, HboneError(why, stream.status or 0))
            return
        self.ctx.report(c, moved)

    def _refused(self, c: Connection, r: Route, e: Exception) -> None:
        log.warning(
            "outbound %s -> %s (%s) failed, connection refused: %s",
            self.workload.key,
            r.authority,
            r.identity,
            e,
        )
        denied = isinstance(e, HboneError) and e.status == 401
        c.response_flags, c.error = ("RBAC" if denied else "UF"), str(e)
        self.ctx.report(c)

    def _headers(self, peer: Any, r: Route) -> list[tuple[str, str]]:
        baggage = [
            f"k8s.namespace.name={self.workload.namespace}",
            f"k8s.pod.name={self.workload.name}",
            f"k8s.node.name={self.ctx.node}",
        ]
        if r.service is not None:
            baggage.append(f"service.name={r.service.name}")
        return [
            ("forwarded", f'for="{peer[0]}:{peer[1]}"'),
            ("baggage", ",".join(baggage)),
            ("traceparent", traceparent()),
        ]

    async def _dial(self, r: Route, ctx: ssl.SSLContext, not_after: float) -> HboneIO:
        assert self.ns is not None and self.pool is not None and r.identity is not None
        sock = await connect(self.ns, r.address, self.ctx.connect_timeout)
        return await self.pool.tunnel(sock, ctx, r.identity, not_after)

    # -- 15006 -----------------------------------------------------------------------------

    async def inbound_plain(self, client: socket.socket, peer: Any) -> None:
        assert self.ns is not None
        try:
            dst = original_dst(client)
        except OSError:
            abort(client)
            return
        v = admit_plaintext(
            dst, self._view().pod, self.ctx.store.current.policies.policies.values(), peer[0]
        )
        if v.self_call:
            self._self_call(peer[0], dst[1])
            abort(client)
            return
        c = Connection(
            "destination",
            "plaintext",
            f"{peer[0]}:{peer[1]}",
            f"{dst[0]}:{dst[1]}",
            source=self.ctx.store.current.workloads_by_ip.get(peer[0]),
            destination=self.workload,
            destination_principal=str(self.identity),
            trust_domain=self.ctx.trust_domain,
        )
        if not v.allowed:
            abort(client)  # plaintext has no status to carry a 401: the connection is reset
            self._denied(c, v, peer[0], dst[1])
            return
        try:
            upstream = await connect(self.ns, dst, self.ctx.connect_timeout, source_ip=peer[0])
        except (OSError, trio.TooSlowError) as e:
            log.info("inbound plaintext to %s failed: %s", self.workload.key, e)
            abort(client)
            c.response_flags, c.error = "UF", str(e)
            self.ctx.report(c)
            return
        live = _Live(trio.CancelScope(), None, peer[0], dst[1])
        moved = await self._relay_live(live, relay_tcp(client, upstream))
        self._report_live(c, live, moved)

    # -- 15008 -----------------------------------------------------------------------------

    @property
    def inbound_tunnels(self) -> int:
        return self.hbone.tunnels

    def _on_request(
        self, ev: RequestReceived, io: HboneIO, peer_ip: str, peer_id: SpiffeId
    ) -> None:
        req = check_request(ev)
        v = admit_connect(
            req,
            self._view().pod,
            self.ctx.store.current.policies.policies.values(),
            peer_id,
            peer_ip,
        )
        if not v.allowed:
            io.conn.respond(req.stream_id, v.status, end_stream=True)
            io.queue_output()
            if (stream := io.streams.get(req.stream_id)) is not None:
                stream.close()
            if v.status == 400:
                log.info("HBONE from %s to %s: 400, %s", peer_id, self.workload.key, v.why)
                return
            port = req.target[1] if isinstance(req, ConnectRequest) else 0
            self._denied(self._inbound(peer_ip, peer_id, port), v, str(peer_id), port)
            return
        assert isinstance(req, ConnectRequest)
        if not self.ctx.admission.take_stream():
            log.warning(
                "HBONE from %s to %s: 503, stream limit reached", peer_id, self.workload.key
            )
            io.conn.respond(req.stream_id, 503, end_stream=True)
            io.queue_output()
            if (stream := io.streams.get(req.stream_id)) is not None:
                stream.close()
            return
        io.spawn(
            req.stream_id,
            self._serve_connect,
            req.stream_id,
            req.target,
            io,
            peer_ip,
            peer_id,
            self._service_from(req.headers.get("baggage", "")),
        )

    async def _relay_live(
        self, live: _Live, relay: Coroutine[Any, Any, Transferred]
    ) -> Transferred | None:
        """Run a relay as a live inbound connection; None if a policy change cut it."""
        self.live.add(live)
        try:
            with live.scope:
                return await relay
            return None
        finally:
            self.live.discard(live)

    def _report_live(self, c: Connection, live: _Live, moved: Transferred | None) -> None:
        if live.denied is None:
            self.ctx.report(c, moved)
            return
        d = live.denied.decision
        c.response_flags, c.policy = "RBAC", d.policy if d else ""
        c.error = f"closed after a policy change: {live.denied.why}"
        self.ctx.report(c)

    def reevaluate(self) -> int:
        """Judge every live inbound connection again with the policies in force now (as
        ztunnel does); cut those they deny. Returns how many were cut."""
        view = self._view()
        policies = view.state.policies.policies.values()
        cut = 0
        for live in list(self.live):
            v = judge(view.pod, policies, live.peer, live.peer_ip, live.port)
            if not v.allowed and live.denied is None:
                live.denied = v
                live.scope.cancel()  # the relay resets both sides
                log.info(
                    "%s -> %s:%d closed after a policy change: %s",
                    live.peer or live.peer_ip,
                    self.workload.key,
                    live.port,
                    v.why,
                )
                cut += 1
        return cut

    def _denied(self, c: Connection, v: Verdict, source: str, port: int) -> None:
        """Log, count and report a connection an inbound decision denied (401)."""
        d = v.decision
        if d is None:  # around the pod's waypoint
            log.info("%s -> %s refused: %s", source, self.workload.key, v.why)
        else:
            self.ctx.count_denial(self.workload, source, port, d)
        c.response_flags, c.policy = "RBAC", d.policy if d else ""
        c.error = f"denied by policy {d.policy}: {d.reason}" if d and d.policy else v.why
        self.ctx.report(c)

    def _self_call(self, peer_ip: str, port: int) -> None:
        """A connection for one of the agent's own ports (15001/15006/15008) on this pod:
        refused. Passed on, the agent would connect to itself, and that connection again."""
        log.info("%s -> %s:%d refused: the mesh agent's own port", peer_ip, self.workload.key, port)
        c = Connection(
            "destination",
            "plaintext",
            peer_ip,
            f"{self.ip}:{port}",
            source=self.ctx.store.current.workloads_by_ip.get(peer_ip),
            destination=self.workload,
            destination_principal=str(self.identity),
            trust_domain=self.ctx.trust_domain,
        )
        c.response_flags, c.error = "UH", f"port {port} is the mesh agent's own"
        self.ctx.report(c)

    def _inbound(
        self, peer_ip: str, peer_id: SpiffeId, port: int, service: Service | None = None
    ) -> Connection:
        """The record of an HBONE connection arriving at this pod (reporter: destination)."""
        return Connection(
            "destination",
            "hbone",
            peer_ip,
            f"{self.ip}:{port}",
            source=self.ctx.store.current.workloads_by_ip.get(peer_ip),
            source_principal=str(peer_id),
            destination=self.workload,
            destination_principal=str(self.identity),
            service=service,
            trust_domain=self.ctx.trust_domain,
        )

    def _view(self) -> _PodView:
        """What the current snapshot says about this pod, worked out once per snapshot: every
        inbound connection asks (the state is immutable, so nothing here goes stale)."""
        state = self.ctx.store.current
        view = self._pod_view
        if view is None or view.state is not state:
            current = state.workload(self.workload.namespace, self.workload.name) or self.workload
            bound = frozenset(state.bound_waypoints(current))
            view = self._pod_view = _PodView(
                state,
                PodFacts(
                    current,
                    self.ip,
                    bound,
                    frozenset(wp.identity(self.ctx.trust_domain) for wp in bound),
                ),
            )
        return view

    def _service_from(self, baggage: str) -> Service | None:
        """The service the client addressed, from its `baggage` (`service.name=...`)."""
        view = self._view()
        if baggage in view.services:
            return view.services[baggage]
        names = [
            value
            for key, _, value in (item.strip().partition("=") for item in baggage.split(","))
            if key == "service.name"
        ]
        found = next(
            (
                s
                for name in names
                for s in view.state.services
                if s.name == name and s.namespace == self.workload.namespace
            ),
            None,
        )
        if len(view.services) < 1024:  # baggage repeats per client pod and service
            view.services[baggage] = found
        return found

    async def _serve_connect(  # noqa: PLR0917 - spawned by trio, which passes positionals
        self,
        stream_id: int,
        target: tuple[str, int],
        io: HboneIO,
        peer_ip: str,
        peer_id: SpiffeId,
        service: Service | None = None,
    ) -> None:
        """Connect the admitted stream to the app and relay; its admission ends with it."""
        try:
            assert self.ns is not None
            stream = io.streams.get(stream_id)
            if stream is None:
                return
            c = self._inbound(peer_ip, peer_id, target[1], service)
            if stream.reset_code is not None:
                # Reset by the client before this task ran (a CONNECT and its RST_STREAM in one
                # read, the "rapid reset" pattern): no connection to the app that nobody waits for.
                stream.close()
                c.response_flags, c.error = "DC", "reset by the client before the app was reached"
                self.ctx.report(c)
                return
            if not self.ctx.admission.take_connect():
                log.warning("HBONE to %s:%d: 503, too many app connections being opened", *target)
                io.conn.respond(stream_id, 503, end_stream=True)
                stream.close()
                io.queue_output()
                c.response_flags, c.error = "UO", "too many app connections being opened"
                self.ctx.report(c)
                return
            try:
                upstream = await connect(
                    self.ns, target, self.ctx.connect_timeout, source_ip=peer_ip
                )
            except (OSError, trio.TooSlowError) as e:
                log.info("HBONE to %s:%d: 503, the app refused: %s", *target, e)
                io.conn.respond(stream_id, 503, end_stream=True)
                stream.close()
                io.queue_output()
                c.response_flags, c.error = "UF", str(e)
                self.ctx.report(c)
                return
            finally:
                self.ctx.admission.drop_connect()
            # A client that sent data with its CONNECT did not wait for the answer: it leaves with
            # the app's first bytes (or FIN), so an answer at once crosses back as one packet.
            io.conn.respond(stream_id, 200, hold=stream.has_buffered)
            live = _Live(trio.CancelScope(), peer_id, peer_ip, target[1])
            moved = await self._relay_live(live, relay_stream(upstream, stream))
            # relay_stream counts from the app's side here: its `up` went back to the client.
            if moved is not None:
                moved = Transferred(moved.down, moved.up)
            self._report_live(c, live, moved)
        finally:
            self.ctx.admission.drop_stream()
