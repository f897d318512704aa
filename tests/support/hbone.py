"""Two HboneIO ends over real TLS 1.3 with mesh certificates, and an echoing server."""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.support.mesh import TD, InProcessCa
from veil.core.hbone import BadRequest, ConnectRequest, HboneConnection, check_request
from veil.core.spiffe import SpiffeId
from veil.runtime.hbone.io import HboneError, HboneIO, TlsSocket
from veil.runtime.identity.manager import CertificateManager
from veil.runtime.identity.tls import tunnel_expiry, verify_peer

FRONTEND = SpiffeId(TD, "shop", "frontend")
CATALOG = SpiffeId(TD, "shop", "catalog")


async def echo(io: HboneIO, req: ConnectRequest) -> None:
    stream = io.streams[req.stream_id]
    io.conn.respond(req.stream_id, 200)
    io.queue_output()
    await io.flush()
    try:
        while data := await stream.receive():
            await stream.send(data)
        await stream.send_eof()
    except HboneError:
        io.served_resets += 1  # type: ignore[attr-defined]
    stream.close()


def on_request(ev, io):
    req = check_request(ev)
    if isinstance(req, BadRequest) or req.target[1] == 9:
        io.conn.respond(ev.stream_id, 400 if isinstance(req, BadRequest) else 503, end_stream=True)
        io.streams.pop(ev.stream_id, None)
        io.queue_output()
        return
    io.spawn(req.stream_id, echo, io, req)


def sink(
    received: Callable[[bytes | memoryview], None], done: trio.Event
) -> Callable[[Any, HboneIO], None]:
    """A server's request handler that accepts every CONNECT and hands what each stream
    carries to `received`, setting `done` at a stream's end."""

    def on_connect(ev: Any, io: HboneIO) -> None:
        req = check_request(ev)
        io.conn.respond(ev.stream_id, 200)
        io.queue_output()

        async def drain() -> None:
            stream = io.streams[ev.stream_id]
            while data := await stream.receive():
                received(data)
            done.set()

        io.spawn(req.stream_id, drain)

    return on_connect


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: (the accepted end, the connecting end)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    client = socket.create_connection(lst.getsockname())
    server, _ = lst.accept()
    lst.close()
    return server, client


async def hbone_pair(
    tmp_path: Path,
    nursery: trio.Nursery,
    handler: Any,
    socks: tuple[socket.socket, socket.socket] | None = None,
    ttl: datetime.timedelta = datetime.timedelta(hours=1),
    run_server: bool = True,
) -> tuple[HboneIO, HboneIO]:
    """A client and a server HboneIO over real TLS 1.3, both running: on a socketpair, or on
    `socks` (server end, client end) when given; certificates valid for `ttl`. Without
    `run_server` the server end never reads: a peer gone silent after the handshake."""
    ca = InProcessCa(tmp_path, ttl=ttl)
    certs = CertificateManager(ca.fetcher("node2"))
    await nursery.start(certs.run)
    server_cred, client_cred = await certs.get(CATALOG), await certs.get(FRONTEND)
    a, b = socks or socket.socketpair()
    server_tls = TlsSocket(a, server_cred.server_context, server_side=True)
    client_tls = TlsSocket(b, client_cred.client_context, server_side=False)
    async with trio.open_nursery() as n:
        n.start_soon(server_tls.handshake)
        n.start_soon(client_tls.handshake)
    assert verify_peer(client_tls.ssl, expected={CATALOG}) == CATALOG
    assert verify_peer(server_tls.ssl, trust_domain=TD) == FRONTEND
    server = HboneIO(server_tls, HboneConnection(client=False), "client", handler)
    server.expires = tunnel_expiry(server_tls.ssl, server_cred.not_after)
    server.served_resets = 0  # type: ignore[attr-defined]
    client = HboneIO(client_tls, HboneConnection(client=True), "server")
    client.expires = tunnel_expiry(client_tls.ssl, client_cred.not_after)
    if run_server:
        await nursery.start(server.run)
    await nursery.start(client.run)
    return client, server


async def raw_tunnel(netns_path: str, target: str, ctx: ssl.SSLContext) -> TlsSocket:
    """A TLS connection to `target`:15008 from inside a netns, handshaken: frames are then
    written by hand (hostile-input tests)."""
    from veil.agent.capture.netns import NetNs  # noqa: PLC0415

    ns = NetNs(netns_path)
    try:
        sock = ns.socket(mark=False)
        sock.setblocking(True)
        sock.connect((target, 15008))
    finally:
        ns.close()
    tls = TlsSocket(sock, ctx, server_side=False)
    await tls.handshake()
    return tls
