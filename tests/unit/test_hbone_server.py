"""The one HBONE server (issue 18, item 3) that the agent's pods and the waypoint both run:
verified identities in, caps held, nothing served without a certificate."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio

from tests.support.hbone import CATALOG, FRONTEND
from tests.support.mesh import TD, InProcessCa
from tests.support.waiting import until
from veil.core.admission import Admission, Limits
from veil.core.hbone import HboneConnection, check_request
from veil.runtime.hbone.io import HboneIO, TlsSocket
from veil.runtime.hbone.server import HboneServer
from veil.runtime.identity.manager import CertificateManager


async def manager(nursery: trio.Nursery, ca: InProcessCa, *identities) -> CertificateManager:
    mgr = CertificateManager(ca.fetcher("node2"))
    await nursery.start(mgr.run)
    mgr.set_identities(list(identities))
    return mgr


def server(
    mgr: CertificateManager, admission: Admission, seen: list[tuple[str, str]]
) -> HboneServer:
    def on_request(ev, io, peer_ip, peer_id):
        seen.append((peer_ip, str(peer_id)))
        io.conn.respond(check_request(ev).stream_id, 200, end_stream=True)
        io.queue_output()

    return HboneServer(
        mgr,
        CATALOG,
        TD,
        admission,
        scope="10.244.1.7",
        name="shop/catalog-1",
        on_request=on_request,
    )


async def connect(
    nursery: trio.Nursery, srv: HboneServer, client_mgr: CertificateManager
) -> tuple[HboneIO, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    nursery.start_soon(srv.handle, a, ("10.244.1.5", 40000))
    cred = await client_mgr.get(FRONTEND)
    tls = TlsSocket(b, cred.client_context, server_side=False)
    return HboneIO(tls, HboneConnection(client=True), "test client"), b


async def test_a_peer_of_the_trust_domain_gets_its_streams_and_is_counted(tmp_path):
    ca = InProcessCa(tmp_path)
    seen: list[tuple[str, str]] = []
    async with trio.open_nursery() as n:
        srv = server(await manager(n, ca, CATALOG), Admission(), seen)
        client_mgr = await manager(n, ca, FRONTEND)
        await client_mgr.get(FRONTEND)
        io, _ = await connect(n, srv, client_mgr)
        await io.tls.handshake()
        await n.start(io.run)
        stream = await io.open_stream("10.244.1.7:80", [], wait_response=True)
        assert stream.status == 200
        assert seen == [("10.244.1.5", str(FRONTEND))]
        assert srv.tunnels == 1
        n.cancel_scope.cancel()


async def test_over_the_tunnel_budget_the_connection_is_closed_unread(tmp_path):
    ca = InProcessCa(tmp_path)
    seen: list[tuple[str, str]] = []
    admission = Admission(Limits(tunnels_per_peer=0))
    async with trio.open_nursery() as n:
        srv = server(await manager(n, ca, CATALOG), admission, seen)
        client_mgr = await manager(n, ca, FRONTEND)
        io, _ = await connect(n, srv, client_mgr)
        await io.tls.handshake()
        await until(lambda: admission.refused.get("tunnels_per_peer") == 1)
        assert seen == [] and srv.tunnels == 0
        n.cancel_scope.cancel()


async def test_without_its_certificate_the_server_serves_nothing(tmp_path):
    """Fail closed: a listener whose identity has no certificate (this node may not obtain
    it) closes every connection before TLS."""
    ca = InProcessCa(tmp_path)
    seen: list[tuple[str, str]] = []
    async with trio.open_nursery() as n:
        no_cert = CertificateManager(ca.fetcher("node1"))  # catalog runs on node2
        await n.start(no_cert.run)
        srv = server(no_cert, Admission(), seen)
        srv.cert_timeout = 0.2
        client_mgr = await manager(n, ca, FRONTEND)
        io, _ = await connect(n, srv, client_mgr)
        with trio.fail_after(5), pytest.raises(OSError):
            await io.tls.handshake()
        assert seen == [] and srv.tunnels == 0
        n.cancel_scope.cancel()


async def test_a_peer_ended_for_a_flood_is_refused_before_tls_for_a_while(tmp_path):
    """A PING flood ends the tunnel (ENHANCE_YOUR_CALM); the same peer's next connection is
    closed before any handshake work, and counted; other peers are served."""
    from veil.core.hbone import PING, frame_header  # noqa: PLC0415

    ping = frame_header(8, PING, 0, 0) + b"12345678"

    ca = InProcessCa(tmp_path)
    seen: list[tuple[str, str]] = []
    admission = Admission()
    async with trio.open_nursery() as n:
        srv = server(await manager(n, ca, CATALOG), admission, seen)
        client_mgr = await manager(n, ca, FRONTEND)
        io, _ = await connect(n, srv, client_mgr)
        await io.tls.handshake()
        io.tls.write(io.conn.data_to_send())  # the preface
        with trio.move_on_after(5):
            while "10.244.1.5" not in admission.penalties:  # PINGs, never reading answers
                io.tls.write(ping * 100)
                try:
                    await io.tls.flush()
                except OSError:
                    await trio.sleep(0.01)
        assert "10.244.1.5" in admission.penalties
        again, _ = await connect(n, srv, client_mgr)
        with pytest.raises((OSError, ssl.SSLError)):
            await again.tls.handshake()
        assert admission.refused["penalized"] == 1
        assert admission.handshakes == 0
        n.cancel_scope.cancel()


def test_a_flood_s_penalty_doubles_on_repeat_and_is_forgotten_after_quiet():
    a = Admission(Limits(penalty=1.0, max_penalty=4.0))
    assert a.penalize("p", now=100.0) == 1.0
    assert not a.take_handshake("p", now=100.5) and a.take_handshake("q", now=100.5)
    assert a.take_handshake("p", now=101.0)  # served
    a.drop_handshake("p")
    assert a.penalize("p", now=101.5) == 2.0  # again soon after: twice as long
    assert a.penalize("p", now=103.6) == 4.0
    assert a.penalize("p", now=107.7) == 4.0  # capped
    assert not a.take_handshake("p", now=111.6)
    assert a.take_handshake("p", now=120.0)  # quiet as long again: forgotten
    assert "p" not in a.penalties
    assert a.penalize("p", now=120.0) == 1.0
    assert a.refused["penalized"] == 2
