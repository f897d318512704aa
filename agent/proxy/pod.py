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

import functools
import socket
from collections.abc import Sequence
from typing import Any

import trio

from veil.agent.capture.netns import NetNs, listen
from veil.agent.proxy.context import CERT_TIMEOUT, CONNECT_TIMEOUT, PodRuntime, ProxyContext
from veil.agent.proxy.inbound_listener import InboundListener
from veil.agent.proxy.outbound_listener import OutboundListener
from veil.core.ports import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT
from veil.core.state import Workload
from veil.runtime.hbone.pool import HbonePool
from veil.runtime.hbone.server import HboneServer
from veil.runtime.listener import Handler, serve

__all__ = ["CERT_TIMEOUT", "CONNECT_TIMEOUT", "PodProxy", "ProxyContext"]
EXPIRY_GRACE = 30.0  # seconds a server still takes streams on a tunnel past its certificates


def pod_addresses(ip: str) -> tuple[tuple[str, int], ...]:
    """A pod's listeners, in the order a hand-over passes them: outbound, inbound
    plaintext, inbound HBONE."""
    return (("127.0.0.1", OUTBOUND_PORT), ("0.0.0.0", INBOUND_PLAIN_PORT), (ip, HBONE_PORT))


class PodProxy:
    """One enrolled pod: its three listeners (each role in its own module) and their
    lifetime; cancelling `run()` closes listeners, tunnels and relays.

    `listeners`: the pod's listening sockets handed over by a predecessor agent (in
    `ADDRESSES` order), served as they are: connections waiting in their accept queues are
    taken by whichever agent accepts first, none is lost."""

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        netns_path: str,
        ip: str,
        listeners: Sequence[socket.socket] = (),
    ) -> None:
        self.netns_path = netns_path
        self.listeners: list[socket.socket] = list(listeners)
        self.active = 0  # connections being handled
        self.handled = 0  # connections accepted, ever
        self._accepting = trio.CancelScope()
        self.pod = PodRuntime(ctx, workload, ip, workload.identity(ctx.trust_domain))
        self.outbound = OutboundListener(self.pod)
        self.inbound = InboundListener(self.pod)
        self.hbone = HboneServer(
            ctx.certs,
            self.pod.identity,
            ctx.trust_domain,
            ctx.admission,
            scope=ip,
            name=workload.key,
            on_request=self.inbound.on_request,
            cert_timeout=ctx.cert_timeout,
            expiry_grace=EXPIRY_GRACE,
        )

    @property
    def inbound_tunnels(self) -> int:
        return self.hbone.tunnels

    def addresses(self) -> tuple[tuple[str, int], ...]:
        return pod_addresses(self.pod.ip)

    def reevaluate(self) -> int:
        """Judge the pod's live inbound connections again (policies changed); the number cut."""
        return self.inbound.reevaluate()

    async def hand_over(self) -> None:
        """The successor serves the listeners now: stop accepting (our copies close), let the
        connections in hand finish, and move the inbound tunnels' clients to it."""
        self._accepting.cancel()
        await self.hbone.drain()

    async def _counted(self, handler: Handler, conn: socket.socket, peer: Any) -> None:
        self.active += 1
        self.handled += 1
        try:
            await handler(conn, peer)
        finally:
            self.active -= 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ns = self.pod.ns = NetNs(self.netns_path)
        socks = self.listeners
        try:
            if socks:
                check_inherited(socks, self.addresses())
            else:
                for address in self.addresses():
                    socks.append(listen(ns, address))
            async with trio.open_nursery() as nursery:
                self.pod.pool = HbonePool(nursery)
                nursery.start_soon(self.pod.pool.reap_idle)
                handlers = (self.outbound.handle, self.inbound.plaintext, self.hbone.handle)
                with self._accepting:
                    async with trio.open_nursery() as accepting:
                        for sock, handler in zip(socks, handlers, strict=True):
                            accepting.start_soon(
                                serve, sock, functools.partial(self._counted, handler), nursery
                            )
                        socks = []  # owned by the listeners now
                        task_status.started()
        finally:
            for s in socks:
                s.close()
            ns.close()


def check_inherited(socks: Sequence[socket.socket], addresses: Sequence[tuple[str, int]]) -> None:
    """Handed-over sockets must be the listeners this pod needs, in order (a mix-up would
    send a pod's traffic to another's proxy)."""
    if len(socks) != len(addresses):
        raise OSError(f"{len(socks)} listeners handed over, {len(addresses)} expected")
    for s, address in zip(socks, addresses, strict=True):
        got = s.getsockname()[:2]
        listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if tuple(got) != tuple(address) or not listening:
            raise OSError(
                f"handed-over socket is {got} (listening: {bool(listening)}), not {address}"
            )
