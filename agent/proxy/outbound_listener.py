"""The outbound role (127.0.0.1:15001 in the pod): the app's captured connections, sent where
the pure `route()` says: HBONE to the destination's 15008 (pooled, its identity verified),
passthrough, or refused. Every failure closes the app's connection: never plaintext instead."""

from __future__ import annotations

import logging
import random
import secrets
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import trio

from veil.agent.capture.netns import connect, original_dst
from veil.agent.proxy.context import PodRuntime
from veil.agent.proxy.copy import abort, relay_stream, relay_tcp
from veil.agent.proxy.outbound import Kind, Route, route
from veil.runtime.hbone.io import HboneError, HboneIO
from veil.runtime.identity.manager import NoCertificate
from veil.runtime.identity.tls import PeerIdentityError
from veil.runtime.telemetry.metrics import Connection

log = logging.getLogger("veil.proxy")


_trace_ids = random.Random(secrets.randbits(64))  # trace ids need uniqueness, not secrecy


def traceparent() -> str:
    """A new W3C trace context (a root span) for the tunnelled connection."""
    return f"00-{_trace_ids.getrandbits(128):032x}-{_trace_ids.getrandbits(64):016x}-01"


class OutboundListener:
    def __init__(self, pod: PodRuntime) -> None:
        self.pod = pod

    async def handle(self, client: socket.socket, peer: Any) -> None:
        assert self.pod.ns is not None and self.pod.pool is not None
        try:
            dst = original_dst(client)
        except OSError as e:
            # Not a redirected connection (an app dialling 127.0.0.1:15001 itself), or its
            # record is gone: nowhere known to send it.
            log.info(
                "outbound %s from port %d refused: no original destination (%s)",
                self.pod.workload.key,
                peer[1],
                e.strerror,
            )
            abort(client)
            return
        r = route(self.pod.ctx.store.current, self.pod.workload, dst, self.pod.ctx.trust_domain)
        # Only this pod reaches its 127.0.0.1:15001, from its own IP (iptables mode) or from
        # 127.0.0.1 (eBPF mode, where the connect was rewritten before a source was chosen):
        # the client is the pod's IP either way.
        peer = (self.pod.ip, peer[1])
        c = Connection(
            "source",
            "hbone" if r.kind is Kind.HBONE else "passthrough",
            f"{peer[0]}:{peer[1]}",
            f"{r.address[0]}:{dst[1]}",
            source=self.pod.workload,
            source_principal=str(self.pod.identity),
            destination=r.workload,
            destination_principal=str(r.identity) if r.identity else "unknown",
            service=r.service,
            trust_domain=self.pod.ctx.trust_domain,
        )
        if r.kind is Kind.REJECT:
            log.info("outbound %s -> %s:%d refused: %s", self.pod.workload.key, *dst, r.reason)
            abort(client)
            c.response_flags, c.error = "UH", r.reason
            self.pod.ctx.report(c)
            return
        if r.kind is Kind.PASSTHROUGH:
            try:
                upstream = await connect(self.pod.ns, r.address, self.pod.ctx.connect_timeout)
            except (OSError, trio.TooSlowError) as e:
                log.info("passthrough %s -> %s:%d failed: %s", self.pod.workload.key, *r.address, e)
                abort(client)
                c.response_flags, c.error = "UF", str(e)
                self.pod.ctx.report(c)
                return
            self.pod.ctx.report(c, await relay_tcp(client, upstream))
            return
        await self.tunnel(client, peer, r, c)

    async def tunnel(
        self,
        client: socket.socket,
        peer: Any,
        r: Route,
        c: Connection,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        """The connection over an HBONE stream as the pod's identity, as `r` says; refused
        (reset) on any failure, never sent another way."""
        assert self.pod.pool is not None
        try:
            cred = await self.pod.ctx.certs.get(
                self.pod.identity, timeout=self.pod.ctx.cert_timeout
            )
            stream = await self.pod.pool.open_stream(
                (r.address, r.identity),
                lambda: self._dial(r, cred.client_context, cred.not_after),
                r.authority,
                [*self._headers(peer, r), *extra],
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
                else stream.error
                or f"stream reset by {stream.io.peer} before an answer (code {stream.reset_code})"
            )
            self._refused(c, r, HboneError(why, stream.status or 0))
            return
        self.pod.ctx.report(c, moved)

    def _refused(self, c: Connection, r: Route, e: Exception) -> None:
        log.warning(
            "outbound %s -> %s (%s) failed, connection refused: %s",
            self.pod.workload.key,
            r.authority,
            r.identity,
            e,
        )
        denied = isinstance(e, HboneError) and e.status == 401
        c.response_flags, c.error = ("RBAC" if denied else "UF"), str(e)
        self.pod.ctx.report(c)

    def _headers(self, peer: Any, r: Route) -> list[tuple[str, str]]:
        baggage = [
            f"k8s.namespace.name={self.pod.workload.namespace}",
            f"k8s.pod.name={self.pod.workload.name}",
            f"k8s.node.name={self.pod.ctx.node}",
        ]
        if r.service is not None:
            baggage.append(f"service.name={r.service.name}")
        return [
            ("forwarded", f'for="{peer[0]}:{peer[1]}"'),
            ("baggage", ",".join(baggage)),
            ("traceparent", traceparent()),
        ]

    async def _dial(self, r: Route, ctx: ssl.SSLContext, not_after: float) -> HboneIO:
        assert self.pod.ns is not None and self.pod.pool is not None and r.identity is not None
        sock = await connect(self.pod.ns, r.address, self.pod.ctx.connect_timeout)
        return await self.pod.pool.tunnel(sock, ctx, r.identity, not_after)
