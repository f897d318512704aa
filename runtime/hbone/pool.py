"""Pooled HBONE client connections: one TLS handshake serves up to 100 proxied connections.

Pooled per key (source workload, destination address, expected identities); a connection
with room takes the next stream, otherwise one more is dialled (one dial at a time per key,
so a burst shares the new connection). Connections idle for `idle_timeout` are closed; a
connection whose certificates (either end's) have expired takes no new stream.
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Sequence

import trio

from veil.core.hbone import HboneConnection
from veil.core.spiffe import SpiffeId
from veil.runtime.hbone.io import HboneIO, Stream, TlsSocket
from veil.runtime.identity.tls import tunnel_expiry, verify_peer

Dial = Callable[[], Awaitable[HboneIO]]
IDLE_TIMEOUT = 300.0


class HbonePool:
    def __init__(self, nursery: trio.Nursery, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._nursery = nursery
        self._conns: dict[Hashable, list[HboneIO]] = defaultdict(list)
        self._locks: dict[Hashable, trio.Lock] = defaultdict(trio.Lock)
        self.idle_timeout = idle_timeout
        self.dialled = 0

    def start_conn(self, io: HboneIO) -> Awaitable[None]:
        """Run a freshly dialled connection's reader in the pool's nursery."""
        return self._nursery.start(io.run)

    async def tunnel(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        expected: SpiffeId,
        own_not_after: float = math.inf,
    ) -> HboneIO:
        """A new client connection over a connected socket: TLS, the server must be
        `expected`, then its reader runs in the pool's nursery. The socket is ours either way.
        `own_not_after`: when the client certificate in `ctx` expires."""
        peer = "{}:{}".format(*sock.getpeername()[:2])
        tls = TlsSocket(sock, ctx, server_side=False)
        try:
            await tls.handshake()
            verify_peer(tls.ssl, expected={expected})
            expires = tunnel_expiry(tls.ssl, own_not_after)
        except BaseException:
            tls.close()
            raise
        io = HboneIO(tls, HboneConnection(client=True), peer)
        io.expires = expires
        await self.start_conn(io)
        return io

    async def open_stream(
        self,
        key: Hashable,
        dial: Dial,
        authority: str,
        headers: Sequence[tuple[str, str]],
        wait_response: bool = True,
    ) -> Stream:
        now = time.time()
        for c in self._conns.get(key, ()):  # the common case: no lock, no scheduler pass
            if now >= c.expires:
                c.retire()  # its certificates ran out: the streams on it finish, no new one
            elif not c.closed and c.conn.can_open_stream():
                return await c.open_stream(authority, headers, wait_response)
        async with self._locks[key]:
            conns = self._conns[key]
            conns[:] = [c for c in conns if not c.closed]
            io = next((c for c in conns if c.conn.can_open_stream()), None)
            if io is None:
                io = await dial()
                self.dialled += 1
                conns.append(io)
        return await io.open_stream(authority, headers, wait_response)

    def connections(self) -> list[HboneIO]:
        return [c for conns in self._conns.values() for c in conns if not c.closed]

    async def reap_idle(self, interval: float = 30.0) -> None:
        while True:
            await trio.sleep(interval)
            now = time.monotonic()
            for conns in self._conns.values():
                for c in conns:
                    if not c.streams and now - c.last_active > self.idle_timeout:
                        c.shutdown()  # its reader sees the end and finishes
