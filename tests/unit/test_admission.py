"""What peers may hold of an HBONE server (issue 17, items 5 and 7)."""

from __future__ import annotations

import socket
import ssl

import trio

from tests.support.hbone import hbone_pair, on_request
from tests.support.waiting import until
from veil.core.admission import Admission, Limits
from veil.runtime.hbone.io import FIRST_READ_SIZE, READ_SIZE, TlsSocket


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


async def test_a_tunnel_full_of_small_frames_yields_after_each_read(tmp_path, nursery):
    """Issue 17.6: a tunnel's turn used to last up to 16 reads of 256 KiB, whatever they held;
    one read full of tiny frames now ends the turn, so other tunnels run in between."""
    import struct  # noqa: PLC0415

    from veil.core.hbone import WINDOW_UPDATE, frame_header  # noqa: PLC0415
    from veil.runtime.hbone.io import FAIR_READS  # noqa: PLC0415

    # Loopback TCP with large buffers: the whole burst can sit in the server's socket at once.
    listener = socket.create_server(("127.0.0.1", 0))
    a_side = socket.socket()
    for sock in (listener, a_side):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    a_side.connect(listener.getsockname())
    b_side, _ = listener.accept()
    listener.close()
    client, server = await hbone_pair(tmp_path, nursery, on_request, socks=(b_side, a_side))
    steps: list[int] = []

    class FramesPerStep(trio.abc.Instrument):
        before = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.before = server.conn.frames_received

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            steps.append(server.conn.frames_received - self.before)

    update = frame_header(4, WINDOW_UPDATE, 0, 0) + struct.pack("!I", 1)  # 13 bytes, no answer
    burst = update * (READ_SIZE // len(update) * 3)  # three reads' worth of frames
    instrument = FramesPerStep()
    trio.lowlevel.add_instrument(instrument)
    try:
        client.tls.write(burst)
        client.queue_output()  # sent now and by the client's writer task
        await until(lambda: server.conn.frames_received >= len(burst) // len(update), 10)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    per_read = READ_SIZE // len(update) + 2  # a frame cut at the edges of a read
    assert max(steps) < per_read * 1.5 < len(burst) // len(update)  # about one read a turn
    assert FAIR_READS > 1  # without the frame count, one step could have taken all three reads
