"""The server side of HBONE, one module for every 15008 listener (each enrolled pod's in the
agent, the waypoint's): the handshake under admission caps, the peer's verified identity, the
tunnel's expiry, then an HboneIO whose CONNECT requests go to the listener's own decision.

Fail closed: no certificate yet, a failed handshake, a peer outside the trust domain, or a
full handshake or tunnel budget all close the connection before any stream is read.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from veil.core.admission import Admission
from veil.core.hbone import ErrorCode, HboneConnection, RequestReceived
from veil.core.spiffe import SpiffeId
from veil.runtime.hbone.io import HboneIO, TlsSocket
from veil.runtime.identity.copies import Certificates
from veil.runtime.identity.manager import NoCertificate
from veil.runtime.identity.tls import tunnel_expiry, verify_peer
from veil.runtime.quiet import Quieter

log = logging.getLogger("veil.hbone")
REFUSALS = Quieter()  # refusals a peer provokes: one line per peer and 10 s
DRAIN_NOTICE = 2.0  # seconds between the first GOAWAY of a hand-over and the final one

# A CONNECT arriving on a tunnel: (event, the tunnel, peer IP, peer identity). It answers
# (`io.conn.respond`) and, when it admits the stream, spawns its handler (`io.spawn`).
OnRequest = Callable[[RequestReceived, HboneIO, str, SpiffeId], None]


@dataclass(eq=False)
class HboneServer:
    """One 15008 listener's tunnels, served as `identity`."""

    certs: Certificates
    identity: SpiffeId
    trust_domain: str
    admission: Admission
    scope: str  # whose tunnel budget the tunnels count against (a pod IP, "waypoint")
    name: str  # what the listener serves, for logs
    on_request: OnRequest
    cert_timeout: float = 5.0
    # Seconds a tunnel still takes streams past its certificates' expiry (clients retire it
    # by their own clock; the grace covers one a little behind); None: no expiry enforced.
    expiry_grace: float | None = None
    tunnels: int = 0  # open now
    draining: bool = False  # handed over: each tunnel finishes its streams, then closes
    _open: set[HboneIO] = field(default_factory=set)

    async def handle(self, sock: socket.socket, peer: Any) -> None:
        """One accepted connection (a `veil.runtime.listener.serve` handler)."""
        peer_ip = peer[0]
        admission = self.admission
        if not admission.take_handshake(peer_ip):
            if (held := REFUSALS.allow(peer_ip)) is not None:
                log.warning(
                    "HBONE from %s refused: handshake limit, or penalized for a flood%s",
                    peer_ip,
                    Quieter.suffix(held),
                )
            sock.close()
            return
        try:
            try:
                cred = await self.certs.get(self.identity, timeout=self.cert_timeout)
            except NoCertificate as e:
                log.warning("HBONE to %s refused: %s", self.name, e)
                sock.close()
                return
            tls = TlsSocket(sock, cred.server_context, server_side=True)
            try:
                await tls.handshake()
                peer_id = verify_peer(tls.ssl, trust_domain=self.trust_domain)
            except (OSError, ssl.SSLError, trio.TooSlowError) as e:  # PeerIdentityError too
                log.info("HBONE handshake from %s to %s failed: %s", peer_ip, self.name, e)
                tls.close()
                return
        finally:
            admission.drop_handshake(peer_ip)
        if not admission.take_tunnel(peer_ip, self.scope):
            if (held := REFUSALS.allow((peer_ip, self.name))) is not None:
                log.warning(
                    "HBONE from %s (%s) to %s refused: tunnel limit reached%s",
                    peer_ip,
                    peer_id,
                    self.name,
                    Quieter.suffix(held),
                )
            tls.close()
            return
        io = HboneIO(tls, HboneConnection(client=False), f"{peer_ip} ({peer_id})")
        if self.expiry_grace is not None:
            io.expires = tunnel_expiry(tls.ssl, cred.not_after) + self.expiry_grace
        io.on_request = lambda ev, conn: self.on_request(ev, conn, peer_ip, peer_id)
        self.tunnels += 1
        self._open.add(io)
        if self.draining:
            io.retire()
        try:
            await io.run()
        finally:
            self._open.discard(io)
            self.tunnels -= 1
            admission.drop_tunnel(peer_ip, self.scope)
            if io.violation == ErrorCode.ENHANCE_YOUR_CALM:
                seconds = admission.penalize(peer_ip)
                log.warning(
                    "HBONE from %s (%s) to %s: tunnel ended for a flood; its handshakes are "
                    "refused for %gs",
                    peer_ip,
                    peer_id,
                    self.name,
                    seconds,
                )

    async def drain(self, notice: float = DRAIN_NOTICE) -> None:
        """Hand-over (the listener is another agent's now): tell every client to take its next
        streams elsewhere, serve the streams already on their way for `notice` seconds, then
        retire each tunnel (it closes once its streams have ended). No stream is refused."""
        for io in list(self._open):
            io.notice_shutdown()
        await trio.sleep(notice)
        self.draining = True
        for io in list(self._open):
            io.retire()
