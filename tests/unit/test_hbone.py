"""HBONE over real TLS on a socketpair: CONNECT, flow control, half-close, resets, 400s."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import socket
import struct
import time

import pytest
import trio
import trio.testing

from tests.support.hbone import hbone_pair, on_request
from tests.support.waiting import until
from veil.core.hbone import (
    DATA,
    END_STREAM,
    GOAWAY,
    HEADERS,
    BadRequest,
    ConnectRequest,
    ErrorCode,
    RequestReceived,
    check_request,
    frame_header,
    parse_authority,
)
from veil.runtime.hbone.io import HboneError, HboneIO, Stream
from veil.runtime.hbone.pool import HbonePool


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.244.1.10:8080", ("10.244.1.10", 8080)),
        ("[fd00::1]:80", ("fd00::1", 80)),
        ("10.244.1.10", None),
        ("frontend:80", None),
        ("10.244.1.10:0", None),
        ("10.244.1.10:70000", None),
        ("", None),
    ],
)
def test_parse_authority(authority, expected):
    assert parse_authority(authority) == expected


def request(headers):
    return RequestReceived(1, [(k.decode(), v.decode()) for k, v in headers])


def test_check_request():
    ok = check_request(
        request(
            [
                (b":method", b"CONNECT"),
                (b":authority", b"10.0.0.1:80"),
                (b"forwarded", b'for="10.0.0.2:5555"'),
            ]
        )
    )
    assert isinstance(ok, ConnectRequest) and ok.target == ("10.0.0.1", 80)
    assert ok.forwarded_for == ("10.0.0.2", 5555)
    assert isinstance(
        check_request(request([(b":method", b"GET"), (b":authority", b"x:1")])), BadRequest
    )
    bad = check_request(request([(b":method", b"CONNECT"), (b":authority", b"nohost")]))
    assert isinstance(bad, BadRequest) and "bad authority" in bad.why


@pytest.fixture
async def tunnel(tmp_path, nursery):
    return await hbone_pair(tmp_path, nursery, on_request)


async def test_bytes_survive_flow_control_both_ways(tunnel):
    client, _ = tunnel
    stream = await client.open_stream("10.244.2.11:9080", [("forwarded", 'for="1.2.3.4:5"')])
    payload = os.urandom(24 * 1024 * 1024)  # 6x the stream window, 1.5x the connection window
    got = bytearray()

    async def read():
        while data := await stream.receive():
            got.extend(data)

    async with trio.open_nursery() as n:
        n.start_soon(read)
        for i in range(0, len(payload), 200_000):
            await stream.send(payload[i : i + 200_000])
        await stream.send_eof()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_many_streams_share_one_connection(tunnel):
    client, _ = tunnel

    async def one(i):
        s = await client.open_stream("10.244.2.11:9080", [])
        msg = f"hello {i}".encode() * 100
        await s.send(msg)
        await s.send_eof()
        got = b""
        while data := await s.receive():
            got += data
        assert got == msg
        s.close()

    async with trio.open_nursery() as n:
        for i in range(60):
            n.start_soon(one, i)
    assert not client.streams


async def test_half_close_delivers_everything(tunnel):
    client, _ = tunnel
    s = await client.open_stream("10.244.2.11:9080", [])
    await s.send(b"last words")
    await s.send_eof()  # FIN: the echo still answers after it
    assert await s.receive() == b"last words"
    assert await s.receive() == b""


async def test_reset_reaches_the_other_side(tunnel):
    client, server = tunnel
    s = await client.open_stream("10.244.2.11:9080", [])
    await s.send(b"x")
    assert await s.receive() == b"x"
    s.reset()
    await until(lambda: server.served_resets != 0, 2)


async def test_refusals_carry_the_status(tunnel):
    client, _ = tunnel
    with pytest.raises(HboneError) as e:
        await client.open_stream("10.244.2.11:9", [])
    assert e.value.status == 503
    sid = client.conn.request(
        [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")],
        end_stream=True,
    )
    stream = client.streams[sid] = Stream(client, sid)
    client.queue_output()
    await client.flush()
    assert await stream.response() == 400


async def test_peer_going_away_wakes_every_stream(tunnel):
    client, server = tunnel
    s = await client.open_stream("10.244.2.11:9080", [])
    server.tls.close()
    with trio.fail_after(2), pytest.raises(HboneError):
        await s.receive()


async def echoes(s: Stream, data: bytes) -> bool:
    await s.send(data)
    with trio.fail_after(2):
        return await s.receive() == data


async def test_a_graceful_goaway_lets_open_streams_finish(tunnel):
    """RFC 9113 section 6.8: a peer that goes away (e.g. an Envoy draining) still serves the
    streams it took; the connection takes no new one and closes once they are done."""
    client, server = tunnel
    s = await client.open_stream("10.244.2.11:9080", [])
    assert await echoes(s, b"before")
    server.conn.close()  # GOAWAY(NO_ERROR, last stream id = s.id)
    server.queue_output()
    await until(lambda: not client.conn.can_open_stream(), 2)
    assert await echoes(s, b"after the GOAWAY")
    await s.send_eof()
    assert await s.receive() == b""
    assert not client.closed
    s.close()
    await until(lambda: bool(client.closed and server.closed), 2)


async def test_a_shutdown_notice_sends_new_streams_elsewhere_and_refuses_none(tunnel):
    """A hand-over (RFC 9113 section 6.8's two-step shutdown): after the notice the client
    opens no new stream on the connection, a stream already on its way is still served, and
    the final GOAWAY closes the connection once the streams are done."""
    client, server = tunnel
    s = await client.open_stream("10.244.2.11:9080", [])
    assert await echoes(s, b"before")
    server.notice_shutdown()
    # A stream the client opens before it reads the notice: still taken.
    racing = await client.open_stream("10.244.2.11:9080", [], wait_response=False)
    client.queue_output()
    await until(lambda: not client.conn.can_open_stream(), 2)
    assert await echoes(racing, b"opened as the notice left")
    server.retire()
    assert await echoes(s, b"after the final GOAWAY")
    for stream in (s, racing):
        await stream.send_eof()
        assert await stream.receive() == b""
        stream.close()
    await until(lambda: bool(client.closed and server.closed), 2)


async def test_streams_above_the_goaways_last_id_are_refused(tunnel):
    """Streams the peer says it never processed end as refused; the others carry on."""
    client, server = tunnel
    first = await client.open_stream("10.244.2.11:9080", [])
    second = await client.open_stream("10.244.2.11:9080", [])
    assert await echoes(first, b"1")
    assert await echoes(second, b"2")
    # Raw: our server would name its last stream (the second), not an older one.
    goaway = struct.pack("!IBI", 8 << 8 | GOAWAY, 0, 0) + struct.pack("!II", first.id, 0)
    server.tls.write(goaway)
    server.tls.flush_nowait()
    with trio.fail_after(2), pytest.raises(HboneError):
        await second.receive()
    assert second.reset_code == ErrorCode.REFUSED_STREAM
    assert await echoes(first, b"still served")


async def test_idle_pooled_connections_are_closed(tmp_path, nursery):
    client, server = await hbone_pair(tmp_path, nursery, on_request)
    pool = HbonePool(nursery, idle_timeout=0)

    async def dial() -> HboneIO:
        io: HboneIO = client
        return io

    s = await pool.open_stream("key", dial, "10.244.2.11:9080", [])
    assert await echoes(s, b"x")
    await s.send_eof()
    assert await s.receive() == b""
    s.close()
    nursery.start_soon(pool.reap_idle, 0.01)
    await until(lambda: bool(client.closed and server.closed), 2)
    assert pool.connections() == []


async def test_the_pool_puts_at_most_100_streams_on_a_connection(tmp_path, nursery):
    """150 connections open at once to one destination: two tunnels (one handshake per 100
    streams, never one per connection), and a burst waits for one dial instead of each
    dialling its own."""
    pool = HbonePool(nursery)
    tunnels: list[HboneIO] = []

    async def dial() -> HboneIO:
        client, _ = await hbone_pair(tmp_path / f"dial{len(tunnels)}", nursery, on_request)
        tunnels.append(client)
        return client

    opened: list[Stream] = []
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        s = await pool.open_stream("key", dial, "10.244.2.11:9080", [])
        opened.append(s)
        peak = max(peak, *(len(t.streams) for t in tunnels))
        assert await echoes(s, f"hello {i}".encode())

    async with trio.open_nursery() as n:
        for i in range(150):
            n.start_soon(one, i)
    assert len(tunnels) == pool.dialled == 2
    assert peak == 100
    assert sorted(len(t.streams) for t in tunnels) == [50, 100]
    for s in opened:
        s.reset()
        s.close()
    s = await pool.open_stream("key", dial, "10.244.2.11:9080", [])  # room again: no dial
    assert await echoes(s, b"again")
    assert pool.dialled == 2


SHORT = datetime.timedelta(seconds=2)


async def until_expired(io: HboneIO) -> None:
    # a certificate's expiry is wall-clock time, which no trio clock can move: sleep
    with trio.fail_after(5):
        while time.time() < io.expires:
            await trio.sleep(0.05)


async def test_a_pooled_tunnel_takes_no_new_stream_once_its_certificates_expired(tmp_path, nursery):
    """A pooled connection outlives its handshake: once either end's certificate has expired,
    the next connection gets a new tunnel (new certificates, checked again) and the old one
    closes when its last stream ends."""
    pool = HbonePool(nursery)
    tunnels: list[HboneIO] = []

    async def dial() -> HboneIO:
        client, _ = await hbone_pair(tmp_path / f"d{len(tunnels)}", nursery, on_request, ttl=SHORT)
        tunnels.append(client)
        return client

    held = await pool.open_stream("key", dial, "10.244.2.11:9080", [])
    assert await echoes(held, b"first")
    assert tunnels[0].expires < time.time() + 3
    await until_expired(tunnels[0])
    s = await pool.open_stream("key", dial, "10.244.2.11:9080", [])
    assert await echoes(s, b"second")
    assert pool.dialled == 2 and s.io is tunnels[1]
    assert await echoes(held, b"still served")  # the open stream was not cut
    held.reset()
    held.close()
    await until(lambda: bool(tunnels[0].closed), 2)


async def test_a_server_refuses_new_streams_once_the_tunnels_certificates_expired(
    tmp_path, nursery
):
    """A client that keeps using an expired tunnel (another implementation, or clocks apart):
    the server refuses the stream (REFUSED_STREAM: retry elsewhere) and sends GOAWAY."""
    client, server = await hbone_pair(tmp_path, nursery, on_request, ttl=SHORT)
    await until_expired(server)
    with trio.fail_after(2), pytest.raises(HboneError):
        await client.open_stream("10.244.2.11:9080", [])
    await until(lambda: bool(client.going_away), 2)
    assert not server.streams


async def test_relay_keeps_order_when_the_app_reads_slowly(tmp_path, nursery):
    """Backpressure from the app: the drain task takes over and no byte is reordered."""
    from veil.agent.proxy.copy import relay_stream  # noqa: PLC0415

    app, app_peer = socket.socketpair()
    app_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def relay_to_app(ev, io):
        io.conn.respond(ev.stream_id, 200)
        io.queue_output()
        io.spawn(ev.stream_id, relay_stream, app, io.streams[ev.stream_id])

    client, _server = await hbone_pair(tmp_path, nursery, relay_to_app)
    stream = await client.open_stream("10.0.0.1:80", [])
    payload = os.urandom(8 * 1024 * 1024)
    got = bytearray()
    app_peer.setblocking(False)

    async def slow_app():
        while len(got) < len(payload):
            await trio.lowlevel.wait_readable(app_peer)
            got.extend(app_peer.recv(3000))
            if len(got) % 7 == 0:
                await trio.sleep(0.001)

    async with trio.open_nursery() as n:
        n.start_soon(slow_app)
        for i in range(0, len(payload), 100_000):
            await stream.send(payload[i : i + 100_000])
    assert bytes(got) == payload


async def test_abandoned_streams_give_the_connection_window_back(tunnel):
    """Streams reset with unread data must not eat the 16 MiB connection window for good."""
    client, _ = tunnel

    def echoed(sid: int) -> bool:  # the echo's bytes arrived (the window is 4 MiB)
        return bool(client.conn._recv.get(sid, 0) <= 1024 * 1024 + 1)

    for _ in range(8):  # 8 x 3 MiB unread > the 16 MiB connection window
        s = await client.open_stream("10.244.2.11:9080", [])
        await s.send(os.urandom(3 * 1024 * 1024))  # the echo sends it back; nobody reads it
        await until(functools.partial(echoed, s.id), 5)
        s.reset()
        s.close()
    s = await client.open_stream("10.244.2.11:9080", [])
    await s.send(b"still flowing")
    with trio.fail_after(5):
        assert await s.receive() == b"still flowing"


async def test_early_data_reaches_the_server_before_its_answer(tunnel):
    client, _ = tunnel
    s = await client.open_stream("10.244.2.11:9080", [], wait_response=False)
    assert s.status is None
    await s.send(b"client speaks first")
    await s.send_eof()
    assert await s.receive() == b"client speaks first"
    assert s.status == 200


async def test_a_refusal_after_early_data_resets_the_app_connection(tunnel):
    from veil.agent.proxy.copy import relay_stream  # noqa: PLC0415

    client, _ = tunnel
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TCP: a reset must be visible
        app_peer = socket.create_connection(listener.getsockname())
        app, _ = listener.accept()
    app_peer.sendall(b"sent before the refusal")
    s = await client.open_stream("10.244.2.11:9", [], wait_response=False)  # the server: 503
    with trio.fail_after(2):
        moved = await relay_stream(app, s)
    assert s.status == 503 and s.reset_code is not None
    assert moved.down == 0
    with app_peer, pytest.raises(ConnectionResetError):
        while app_peer.recv(100):
            pass


async def relaying_server(tmp_path, nursery, app):
    """A tunnel whose server relays every stream to `app`, answering as the agent does."""
    from veil.agent.proxy.copy import relay_stream  # noqa: PLC0415

    async def serve(io, sid):
        stream = io.streams[sid]
        io.conn.respond(sid, 200, hold=stream.has_buffered)
        await relay_stream(app, stream)

    return await hbone_pair(
        tmp_path, nursery, lambda ev, io: io.spawn(ev.stream_id, serve, io, ev.stream_id)
    )


async def test_after_early_data_the_answer_waits_for_the_apps_first_bytes(tmp_path, nursery):
    app, app_peer = socket.socketpair()
    app_peer.setblocking(False)
    client, _ = await relaying_server(tmp_path, nursery, app)
    s = await client.open_stream("10.0.0.1:80", [], wait_response=False)
    await s.send(b"hello")
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(app_peer)
    assert app_peer.recv(100) == b"hello"
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert s.status is None  # held: the client did not wait for it
    app_peer.send(b"world")
    app_peer.shutdown(socket.SHUT_WR)
    with trio.fail_after(2):
        assert await s.receive() == b"world"
        assert await s.receive() == b""
    assert s.status == 200


async def test_a_client_waiting_for_the_answer_gets_it_from_a_silent_app(tmp_path, nursery):
    app, _app_peer = socket.socketpair()
    client, _ = await relaying_server(tmp_path, nursery, app)
    with trio.fail_after(2):
        s = await client.open_stream("10.0.0.1:80", [])  # Envoy and ztunnel wait like this
    assert s.status == 200


def tls_writes(io: HboneIO) -> list[bytes]:
    """What `io` hands to TLS from now on (frames, in plaintext), one entry per record."""
    writes: list[bytes] = []
    write = io.tls.write

    def recording(data):
        writes.append(bytes(data))
        write(data)

    io.tls.write = recording  # type: ignore[method-assign]
    return writes


def carrying(writes: list[bytes], payload: bytes) -> bytes:
    """The one record that carries `payload` (the tunnel's own frames may come and go
    around it: settings and window updates)."""
    found = [w for w in writes if payload in w]
    assert len(found) == 1, writes
    return found[0]


async def test_a_connect_its_early_data_and_end_stream_leave_as_one_tls_record(tunnel):
    """Small DATA is queued with the frames around it: the CONNECT, the app's first bytes and
    the END_STREAM are encrypted together (a record each cost a TLS write here and a read at
    the peer, per connection)."""
    client, _ = tunnel
    writes = tls_writes(client)
    s = await client.open_stream("10.244.2.11:9080", [], wait_response=False)
    await s.send(b"ping", push=False)
    await s.send_eof()
    record = carrying(writes, b"ping")
    assert record[3] == HEADERS  # the CONNECT first, then the data
    assert record.endswith(frame_header(0, DATA, END_STREAM, s.id))
    with trio.fail_after(2):
        assert await s.receive() == b"ping"
        assert await s.receive() == b""


async def test_an_outbound_relay_sends_the_connect_with_what_the_app_already_wrote(tunnel):
    """A client app writes as soon as it is connected, before the agent accepted it: the relay
    reads first, so the CONNECT leaves with those bytes (one message, and the server may hold
    its answer for the app's reply) instead of alone before them."""
    from veil.agent.proxy.copy import relay_stream  # noqa: PLC0415

    client, _ = tunnel
    writes = tls_writes(client)
    app, app_peer = socket.socketpair()
    app_peer.sendall(b"ping")

    async def outbound() -> None:  # as PodProxy.outbound: open, then relay, in one task
        s = await client.open_stream("10.244.2.11:9080", [], wait_response=False)
        await relay_stream(app, s, answers=False)

    async with trio.open_nursery() as n:
        n.start_soon(outbound)
        app_peer.setblocking(False)
        with trio.fail_after(2):
            await trio.lowlevel.wait_readable(app_peer)
        assert app_peer.recv(100) == b"ping"  # the echo: CONNECT and data went out
        assert carrying(writes, b"ping")[3] == HEADERS  # in one record, the CONNECT first
        app_peer.shutdown(socket.SHUT_WR)
        with trio.fail_after(2):
            await trio.lowlevel.wait_readable(app_peer)
            assert app_peer.recv(100) == b""
    app_peer.close()
