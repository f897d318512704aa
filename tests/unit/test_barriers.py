"""No connection's failure stops a daemon: each handler kind has a barrier (veil.runtime.guard).

Each test injects a failure into one handler kind (or sends the hostile input that used to
escape it) and then checks that the same server still serves the next connection or stream.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio
import trio.testing

from tests.support.hbone import FRONTEND, hbone_pair, on_request
from tests.support.waiting import until
from tests.support.waypoint import DEST, Pipe, feed, service_policy, waypoint, with_state
from veil.core.grammar import decimal, port_number
from veil.core.hbone import ConnectRequest, RequestReceived, check_request, parse_authority
from veil.runtime import guard, http
from veil.runtime.hbone.io import HboneError, HboneIO
from veil.runtime.listener import serve
from veil.waypoint.http2 import H2Exchange, H2Server
from veil.waypoint.messages import local_reply, send
from veil.waypoint.pipeline import Caller


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


async def get(port: int) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        status, _, _ = await http.request(stream, "GET", "/", "x")
    return status


async def test_control_plane_http_survives_connections_reset_after_the_handshake():
    """Issue 17.1: getpeername() on a connection reset before it ran escaped the nursery."""

    async def handler(req: http.Request) -> http.Response:
        return http.Response.text(200, "ok")

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(http.serve, handler, "127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        for _ in range(300):  # connect and reset, faster than the server accepts
            c = socket.socket()
            c.connect(("127.0.0.1", port))
            rst_close(c)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        with trio.fail_after(5):
            assert await get(port) == 200
        nursery.cancel_scope.cancel()


async def test_control_plane_http_survives_a_connection_whose_task_fails(monkeypatch):
    calls = 0
    real = http.handle_connection

    async def flaky(*args: Any, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        await real(*args, **kw)

    async def handler(req: http.Request) -> http.Response:
        return http.Response.text(200, "ok")

    monkeypatch.setattr(http, "handle_connection", flaky)
    before = guard.ERRORS["http_connection"]
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(http.serve, handler, "127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        with pytest.raises(Exception):  # noqa: B017 - the first connection is cut
            await get(port)
        assert await get(port) == 200
        nursery.cancel_scope.cancel()
    assert guard.ERRORS["http_connection"] == before + 1


async def test_the_proxies_accept_loop_survives_a_failing_handler():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    served: list[int] = []

    async def handler(conn: socket.socket, peer: object) -> None:
        served.append(1)
        if len(served) == 1:
            raise ValueError("injected")
        conn.close()

    before = guard.ERRORS["handler"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener, handler)
        await trio.testing.wait_all_tasks_blocked()
        first = socket.create_connection(listener.getsockname())
        await until(lambda: len(served) >= 1, 2)
        assert first.recv(1) == b""  # the failed connection was closed, not leaked
        second = socket.create_connection(listener.getsockname())
        await until(lambda: len(served) >= 2, 2)
        first.close()
        second.close()
        nursery.cancel_scope.cancel()
    assert guard.ERRORS["handler"] == before + 1


async def test_a_failing_stream_handler_resets_its_stream_only(tmp_path: Path, nursery):
    async def broken(io: HboneIO, req: ConnectRequest) -> None:
        raise RuntimeError("injected")

    def on_req(ev: RequestReceived, io: HboneIO) -> None:
        req = check_request(ev)
        assert isinstance(req, ConnectRequest)
        if req.target[1] == 666:
            io.spawn(req.stream_id, broken, io, req)
        elif req.target[1] == 667:
            raise KeyError("injected in the request callback")
        else:
            on_request(ev, io)

    client, server = await hbone_pair(tmp_path, nursery, on_req)
    for port in (666, 667):
        stream = await client.open_stream(f"10.0.0.1:{port}", [], wait_response=False)
        client.queue_output()
        with trio.fail_after(5), pytest.raises(HboneError):
            await stream.response()
    ok = await client.open_stream("10.0.0.1:80", [])
    await ok.send(b"still serving")
    with trio.fail_after(5):
        assert bytes(await ok.receive()) == b"still serving"
    assert not client.closed and not server.closed


@pytest.mark.parametrize(
    "text", ["²", "٣", "1²", "\uff18\uff10", "+80", " 80", "80 ", "0x50", "", "1" * 30]
)
def test_numbers_from_peers_are_ascii_digits_only(text):
    """Issue 17.3: '²'.isdigit() is true and int('²') raises."""
    assert decimal(text) is None or text == "1" * 30
    assert port_number(text) is None


def test_ports_in_range():
    assert port_number("1") == 1 and port_number("65535") == 65535
    assert port_number("0") is None and port_number("65536") is None


def test_a_connect_with_a_unicode_digit_port_is_a_bad_request():
    assert parse_authority("10.0.0.1:²") is None
    bad = check_request(RequestReceived(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:²")]))
    assert not isinstance(bad, ConnectRequest)
    ok = check_request(
        RequestReceived(
            1,
            [
                (":method", "CONNECT"),
                (":authority", "10.0.0.1:80"),
                ("forwarded", 'for="1.2.3.4:²"'),
            ],
        )
    )
    assert isinstance(ok, ConnectRequest) and ok.forwarded_for is None


# -- the waypoint -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Host headers
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",  # oversized head
        b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",  # a header line without a name
    ],
)
async def test_the_waypoint_answers_http1_it_cannot_frame_with_400(tmp_path, wire):
    """Issue 17.2: h11's RemoteProtocolError escaped WaypointServer.http1."""
    wp = waypoint(tmp_path)
    pipe = Pipe()
    first, rest = wire[:20], wire[20:]
    for i in range(0, len(rest), 20_000):  # the head in parts, as a client may send it
        await pipe.tx.send(rest[i : i + 20_000])
    await pipe.tx.aclose()
    with trio.fail_after(5):
        await wp.http1(pipe, first, DEST, Caller(FRONTEND, ""))  # type: ignore[arg-type]
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    client.receive_data(bytes(pipe.out))
    resp = client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == 400
    assert pipe.sent_eof or pipe.reset_code is not None


async def test_a_waypoint_reply_to_a_reset_http2_stream_leaves_the_connection_serving(tmp_path):
    """Issue 17.2: h2's StreamClosedError escaped the waypoint's own replies."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    reset_seen = trio.Event()

    async def handler(ex: H2Exchange) -> None:
        if ex.stream_id == 1:
            await until(lambda: ex.gone)
            reset_seen.set()
            await local_reply(ex, pipe, 503, "too late")  # type: ignore[arg-type]
            return
        await send(ex, None, h11.Response(status_code=204, headers=[]))  # type: ignore[arg-type]
        await send(ex, None, h11.EndOfMessage())  # type: ignore[arg-type]

    pipe = Pipe()
    base = [(":scheme", "http"), (":authority", "c:1"), (":method", "GET"), (":path", "/")]
    client.send_headers(1, base, end_stream=True)
    server = H2Server(pipe, handler)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, client.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        client.reset_stream(1)
        await pipe.tx.send(client.data_to_send())
        with trio.fail_after(2):
            await reset_seen.wait()
        client.send_headers(3, base, end_stream=True)
        await pipe.tx.send(client.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        await pipe.tx.aclose()
    assert pipe.reset_code is None  # the HBONE stream carrying the connection lives on
    events = client.receive_data(bytes(pipe.out))
    answered = [e.stream_id for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert answered == [3]


# -- policy bypasses at the waypoint: detection and the TCP path ---------------------------------


def deny_admin_policy() -> dict[str, Any]:
    return service_policy("no-admin", "DENY", {"paths": ["/admin*"]})


@pytest.mark.parametrize(
    "parts",
    [
        (b"G", b"ET /admin HTTP/1.1\r\nHost: catalog\r\n\r\n"),  # split after one byte
        (b"GET /adm", b"in/x HTTP/1.1\r\nHost: catalog\r\n\r\n"),
        (b"\r\n", b"GET /admin HTTP/1.1\r\nHost: catalog\r\n\r\n"),  # leading empty line
        (b"PROPFIND /admin HTTP/1.1\r\nHost: catalog\r\n\r\n",),  # an extension method
        (b"post /admin HTTP/1.1\r\nHost: catalog\r\ncontent-length: 0\r\n\r\n",),
    ],
)
async def test_split_or_unusual_requests_are_judged_as_http(tmp_path, parts):
    """Issue 17.9: these were classified `tcp` and relayed with no authorization at all."""
    wp = waypoint(tmp_path)
    with_state(wp, deny_admin_policy())
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, pipe, *parts)
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))  # type: ignore[arg-type]
    assert pipe.out.startswith(b"HTTP/1.1 403 ")


@pytest.mark.parametrize(
    "wire", [b"\x16\x03\x01\x02\x00hello", b"SSH-2.0-OpenSSH_9.2\r\n", b"GET " + b"a" * 9000]
)
async def test_non_http_streams_are_judged_as_tcp(tmp_path, wire):
    """Issue 17.10: a DENY rule with HTTP fields applies without them on the TCP path."""
    wp = waypoint(tmp_path)
    with_state(wp, deny_admin_policy())
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, pipe, wire)
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))  # type: ignore[arg-type]
    assert pipe.reset_code is not None and not pipe.out
    assert wp.metrics.tcp_denied._value.get() == 1


def test_tcp_judgement_follows_istios_tcp_chain(tmp_path):
    """An ALLOW rule with HTTP fields matches nothing on TCP; L4-only rules apply as written."""
    wp = waypoint(tmp_path)
    allow_get = {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "shop", "name": "get-only"},
        "spec": {
            "targetRefs": [{"kind": "Gateway", "name": "waypoint"}],
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        },
    }
    allow_frontend = {
        **allow_get,
        "metadata": {"namespace": "shop", "name": "frontend"},
        "spec": {
            "targetRefs": [{"kind": "Gateway", "name": "waypoint"}],
            "rules": [{"from": [{"source": {"principals": [FRONTEND.istio_principal]}}]}],
        },
    }
    with_state(wp)
    assert wp.authorize_tcp(DEST, Caller(FRONTEND, "10.244.1.5")) is None  # no policy: allowed
    with_state(wp, allow_get)
    assert wp.authorize_tcp(DEST, Caller(FRONTEND, "10.244.1.5")) is not None
    with_state(wp, allow_get, allow_frontend)
    assert wp.authorize_tcp(DEST, Caller(FRONTEND, "10.244.1.5")) is None


async def test_a_waypoint_http2_client_that_never_reads_cannot_grow_our_output():
    """Issue 17.6 at the waypoint's HTTP/2 listener: PINGs whose answers are never read."""
    from veil.waypoint.http2 import OUTPUT_LIMIT  # noqa: PLC0415

    class StuckPipe(Pipe):
        async def send(self, data: Any) -> None:
            await trio.sleep_forever()  # the client's tunnel never opens its window

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    preface = client.data_to_send()
    pipe = StuckPipe()
    server = H2Server(pipe, lambda ex: trio.sleep(0))  # type: ignore[arg-type]
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    fed = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, preface)
        with trio.move_on_after(0.5):
            while True:
                await pipe.tx.send(ping * 1000)  # blocks once the server stops reading
                fed += 1
        nursery.cancel_scope.cancel()
    assert server.pending_output <= OUTPUT_LIMIT + 1000 * 17  # one read's answers past the limit
    assert fed < 200  # it stopped reading: the rest stayed with the client
