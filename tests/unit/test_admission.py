"""What peers may hold of an HBONE server (issue 17, items 5 and 7)."""

from __future__ import annotations

import socket
import ssl

import trio

from agent.hbone.admission import Admission, Limits
from agent.hbone.io import FIRST_READ_SIZE, READ_SIZE, TlsSocket
from tests.support.hbone import hbone_pair, on_request


def test_caps_refuse_the_newest_and_count_it():
    a = Admission(
        Limits(handshakes_per_peer=2, handshakes=3, tunnels_per_peer=2, tunnels=3, streams=1)
    )
    assert a.take_handshake("p") and a.take_handshake("p") and not a.take_handshake("p")
    assert a.take_handshake("q") and not a.take_handshake("r")  # the node's total
    a.drop_handshake("p")
    assert a.take_handshake("r")
    assert a.take_tunnel("10.0.0.1", "pod") and a.take_tunnel("10.0.0.1", "pod")
    assert not a.take_tunnel("10.0.0.1", "pod")  # per peer and pod
    assert a.take_tunnel("10.0.0.1", "other")  # another pod of the node
    assert not a.take_tunnel("10.0.0.2", "pod")  # the node's total
    a.drop_tunnel("10.0.0.1", "pod")
    assert a.take_tunnel("10.0.0.2", "pod")
    assert a.take_stream() and not a.take_stream()
    assert a.refused == {
        "handshakes_per_peer": 1,
        "handshakes": 1,
        "tunnels_per_peer": 1,
        "tunnels": 1,
        "streams": 1,
    }


def test_a_connection_before_its_handshake_holds_a_small_buffer():
    """Each accepted connection used to allocate 256 KiB before the TLS handshake."""
    a, b = socket.socketpair()
    tls = TlsSocket(a, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), server_side=True)
    assert tls.read_buffer == FIRST_READ_SIZE
    tls.close()
    b.close()


async def test_a_busy_authenticated_tunnel_reads_in_large_pieces(tmp_path, nursery):
    client, server = await hbone_pair(tmp_path, nursery, on_request)
    assert server.tls.read_buffer == FIRST_READ_SIZE  # authenticated, not busy yet
    stream = await client.open_stream("10.0.0.1:80", [])
    payload = b"x" * (2 * 1024 * 1024)
    got = 0
    async with trio.open_nursery() as n:
        n.start_soon(stream.send, payload)
        while got < len(payload):
            got += len(await stream.receive())
    assert server.tls.read_buffer == READ_SIZE
