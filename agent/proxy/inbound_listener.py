"""The inbound roles of a pod: plaintext from outside the mesh (0.0.0.0:15006) and CONNECT
streams on its HBONE tunnels (<pod IP>:15008, served by `veil.runtime.hbone.server`). Each
connection is admitted by a pure decision (`admit_plaintext`, `admit_connect`), relayed to
the app with the client's address, and judged again when the policies change."""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import trio

from veil.agent.capture.netns import connect, original_dst
from veil.agent.proxy.context import PodRuntime
from veil.agent.proxy.copy import Transferred, abort, relay_stream, relay_tcp
from veil.agent.proxy.inbound import PodFacts, Verdict, admit_connect, admit_plaintext, judge
from veil.agent.proxy.outbound import Kind, via_waypoint
from veil.agent.proxy.outbound_listener import OutboundListener
from veil.core.hbone import INGRESS_HEADER, ConnectRequest, RequestReceived, check_request
from veil.core.spiffe import SpiffeId
from veil.core.state import MeshState, Service, Waypoint
from veil.runtime.hbone.io import HboneIO
from veil.runtime.telemetry.metrics import Connection

log = logging.getLogger("veil.proxy")


@dataclass(eq=False)
class _Live:
    """An inbound connection in progress, as its admission judged it: judged again whenever
    the policies change (`InboundListener.reevaluate`), and cut if they now deny it."""

    scope: trio.CancelScope
    peer: SpiffeId | None
    peer_ip: str
    port: int
    denied: Verdict | None = None


@dataclass
class _PodView:
    """One snapshot's answers for one pod (see `InboundListener._view`)."""

    state: MeshState
    pod: PodFacts  # what inbound decisions need: the pod as this snapshot has it
    services: dict[str, Service | None] = field(default_factory=dict)  # by baggage


class InboundListener:
    def __init__(self, pod: PodRuntime) -> None:
        self.pod = pod
        self._pod_view: _PodView | None = None
        self.live: set[_Live] = set()  # inbound connections relaying now

    async def plaintext(self, client: socket.socket, peer: Any) -> None:
        assert self.pod.ns is not None
        try:
            dst = original_dst(client)
        except OSError:
            abort(client)
            return
        v = admit_plaintext(
            dst, self._view().pod, self.pod.ctx.store.current.policies.policies.values(), peer[0]
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
            source=self.pod.ctx.store.current.workloads_by_ip.get(peer[0]),
            destination=self.pod.workload,
            destination_principal=str(self.pod.identity),
            trust_domain=self.pod.ctx.trust_domain,
        )
        if not v.allowed and (wp := self._ingress_waypoint(v)) is not None:
            await self._through_waypoint(client, peer, dst, wp, c)
            return
        if not v.allowed:
            abort(client)  # plaintext has no status to carry a 401: the connection is reset
            self._denied(c, v, peer[0], dst[1])
            return
        try:
            upstream = await connect(
                self.pod.ns, dst, self.pod.ctx.connect_timeout, source_ip=peer[0]
            )
        except (OSError, trio.TooSlowError) as e:
            log.info("inbound plaintext to %s failed: %s", self.pod.workload.key, e)
            abort(client)
            c.response_flags, c.error = "UF", str(e)
            self.pod.ctx.report(c)
            return
        live = _Live(trio.CancelScope(), None, peer[0], dst[1])
        moved = await self._relay_live(live, relay_tcp(client, upstream))
        self._report_live(c, live, moved)

    def _ingress_waypoint(self, v: Verdict) -> Waypoint | None:
        """The waypoint plaintext from outside the mesh goes through instead of being refused
        as a bypass: the pod's (the first by name), when its namespace or a Service of it
        says `veil.dev/ingress-use-waypoint: "true"`."""
        pod = self._view().pod
        if v.decision is not None or not pod.bound:  # denied by a policy, not a bypass
            return None
        if not self.pod.ctx.store.current.ingress_uses_waypoint(pod.workload):
            return None
        return min(pod.bound, key=lambda wp: (wp.namespace, wp.name))

    async def _through_waypoint(
        self, client: socket.socket, peer: Any, dst: tuple[str, int], wp: Waypoint, c: Connection
    ) -> None:
        """Carried to the waypoint as the pod's own identity, saying it is a client from
        outside the mesh (the waypoint believes that of the pod's own agent only and judges
        it as plaintext); the waypoint brings it back over HBONE."""
        state = self.pod.ctx.store.current
        r = via_waypoint(state, wp, dst, self.pod.ctx.trust_domain, random.choice, service=None)
        if r.kind is not Kind.HBONE:
            abort(client)
            c.response_flags, c.error = "UH", r.reason
            self.pod.ctx.report(c)
            return
        await OutboundListener(self.pod).tunnel(client, peer, r, c, [(INGRESS_HEADER, "plaintext")])

    def on_request(self, ev: RequestReceived, io: HboneIO, peer_ip: str, peer_id: SpiffeId) -> None:
        req = check_request(ev)
        v = admit_connect(
            req,
            self._view().pod,
            self.pod.ctx.store.current.policies.policies.values(),
            peer_id,
            peer_ip,
        )
        if not v.allowed:
            io.conn.respond(req.stream_id, v.status, end_stream=True)
            io.queue_output()
            if (stream := io.streams.get(req.stream_id)) is not None:
                stream.close()
            if v.status == 400:
                log.info("HBONE from %s to %s: 400, %s", peer_id, self.pod.workload.key, v.why)
                return
            port = req.target[1] if isinstance(req, ConnectRequest) else 0
            self._denied(self._inbound(peer_ip, peer_id, port), v, str(peer_id), port)
            return
        assert isinstance(req, ConnectRequest)
        if not self.pod.ctx.admission.take_stream():
            log.warning(
                "HBONE from %s to %s: 503, stream limit reached", peer_id, self.pod.workload.key
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
            self.pod.ctx.report(c, moved)
            return
        d = live.denied.decision
        c.response_flags, c.policy = "RBAC", d.policy if d else ""
        c.error = f"closed after a policy change: {live.denied.why}"
        self.pod.ctx.report(c)

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
                    self.pod.workload.key,
                    live.port,
                    v.why,
                )
                cut += 1
        return cut

    def _denied(self, c: Connection, v: Verdict, source: str, port: int) -> None:
        """Log, count and report a connection an inbound decision denied (401)."""
        d = v.decision
        if d is None:  # around the pod's waypoint
            log.info("%s -> %s refused: %s", source, self.pod.workload.key, v.why)
        else:
            self.pod.ctx.count_denial(self.pod.workload, source, port, d)
        c.response_flags, c.policy = "RBAC", d.policy if d else ""
        c.error = f"denied by policy {d.policy}: {d.reason}" if d and d.policy else v.why
        self.pod.ctx.report(c)

    def _self_call(self, peer_ip: str, port: int) -> None:
        """A connection for one of the agent's own ports (15001/15006/15008) on this pod:
        refused. Passed on, the agent would connect to itself, and that connection again."""
        log.info(
            "%s -> %s:%d refused: the mesh agent's own port", peer_ip, self.pod.workload.key, port
        )
        c = Connection(
            "destination",
            "plaintext",
            peer_ip,
            f"{self.pod.ip}:{port}",
            source=self.pod.ctx.store.current.workloads_by_ip.get(peer_ip),
            destination=self.pod.workload,
            destination_principal=str(self.pod.identity),
            trust_domain=self.pod.ctx.trust_domain,
        )
        c.response_flags, c.error = "UH", f"port {port} is the mesh agent's own"
        self.pod.ctx.report(c)

    def _inbound(
        self, peer_ip: str, peer_id: SpiffeId, port: int, service: Service | None = None
    ) -> Connection:
        """The record of an HBONE connection arriving at this pod (reporter: destination)."""
        return Connection(
            "destination",
            "hbone",
            peer_ip,
            f"{self.pod.ip}:{port}",
            source=self.pod.ctx.store.current.workloads_by_ip.get(peer_ip),
            source_principal=str(peer_id),
            destination=self.pod.workload,
            destination_principal=str(self.pod.identity),
            service=service,
            trust_domain=self.pod.ctx.trust_domain,
        )

    def _view(self) -> _PodView:
        """What the current snapshot says about this pod, worked out once per snapshot: every
        inbound connection asks (the state is immutable, so nothing here goes stale)."""
        state = self.pod.ctx.store.current
        view = self._pod_view
        if view is None or view.state is not state:
            current = (
                state.workload(self.pod.workload.namespace, self.pod.workload.name)
                or self.pod.workload
            )
            bound = frozenset(state.bound_waypoints(current))
            view = self._pod_view = _PodView(
                state,
                PodFacts(
                    current,
                    self.pod.ip,
                    bound,
                    frozenset(wp.identity(self.pod.ctx.trust_domain) for wp in bound),
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
                if s.name == name and s.namespace == self.pod.workload.namespace
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
            assert self.pod.ns is not None
            stream = io.streams.get(stream_id)
            if stream is None:
                return
            c = self._inbound(peer_ip, peer_id, target[1], service)
            if stream.reset_code is not None:
                # Reset by the client before this task ran (a CONNECT and its RST_STREAM in one
                # read, the "rapid reset" pattern): no connection to the app that nobody waits for.
                stream.close()
                c.response_flags, c.error = "DC", "reset by the client before the app was reached"
                self.pod.ctx.report(c)
                return
            if not self.pod.ctx.admission.take_connect():
                log.warning("HBONE to %s:%d: 503, too many app connections being opened", *target)
                io.conn.respond(stream_id, 503, end_stream=True)
                stream.close()
                io.queue_output()
                c.response_flags, c.error = "UO", "too many app connections being opened"
                self.pod.ctx.report(c)
                return
            try:
                upstream = await connect(
                    self.pod.ns, target, self.pod.ctx.connect_timeout, source_ip=peer_ip
                )
            except (OSError, trio.TooSlowError) as e:
                log.info("HBONE to %s:%d: 503, the app refused: %s", *target, e)
                io.conn.respond(stream_id, 503, end_stream=True)
                stream.close()
                io.queue_output()
                c.response_flags, c.error = "UF", str(e)
                self.pod.ctx.report(c)
                return
            finally:
                self.pod.ctx.admission.drop_connect()
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
            self.pod.ctx.admission.drop_stream()
