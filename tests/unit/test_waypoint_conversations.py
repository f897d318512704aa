"""The waypoint's HTTP/2 and HTTP/1.1 handling as conversations in memory: a real h2 (or h11)
client on one side, the waypoint's code on the other, bytes passed through a stand-in for
the HBONE stream. No sockets."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import trio
import trio.testing

from tests.support.waypoint import Pipe
from veil.waypoint.http2 import H2Exchange, H2Server
from veil.waypoint.messages import next_event, send

NO_STREAM: Any = None  # an HTTP/2 exchange carries its own stream


def pipe_stream(pipe: Pipe) -> Any:
    return pipe


def h2_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    return c


async def test_http2_requests_multiplexed_with_bodies_in_both_directions():
    client = h2_client()
    got: dict[str, int] = {}

    async def handler(ex: H2Exchange) -> None:
        assert ex.request is not None
        size = 0
        while True:
            ev = await next_event(ex, NO_STREAM)
            if isinstance(ev, h11.Data):
                size += len(ev.data)
            else:
                assert isinstance(ev, h11.EndOfMessage)
                break
        got[ex.request.target.decode()] = size
        body = f"{ex.request.method.decode()} {size}".encode()
        await send(
            ex,
            NO_STREAM,
            h11.Response(
                status_code=200,
                headers=[("content-length", str(len(body))), ("connection", "close")],
            ),
        )
        await send(ex, NO_STREAM, h11.Data(data=body))
        await send(ex, NO_STREAM, h11.EndOfMessage())

    pipe = Pipe()
    base = [(":scheme", "http"), (":authority", "catalog:9080")]
    client.send_headers(1, [(":method", "GET"), (":path", "/a"), *base], end_stream=True)
    client.send_headers(3, [(":method", "POST"), (":path", "/b"), *base])
    for _ in range(4):
        client.send_data(3, b"x" * 10000, end_stream=False)
    client.send_data(3, b"y" * 1000, end_stream=True)
    first = client.data_to_send()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(H2Server(pipe_stream(pipe), handler).run, first)
        await trio.testing.wait_all_tasks_blocked()
        await pipe.tx.aclose()
    events = client.receive_data(bytes(pipe.out))
    status = {
        e.stream_id: dict(e.headers)[b":status"]
        for e in events
        if isinstance(e, h2.events.ResponseReceived)
    }
    bodies: dict[int, bytes] = {}
    for e in events:
        if isinstance(e, h2.events.DataReceived):
            bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
    assert status == {1: b"200", 3: b"200"}
    assert bodies == {1: b"GET 0", 3: b"POST 41000"}
    assert got == {"/a": 0, "/b": 41000}
    heads = [e.headers for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert all(b"connection" not in dict(h) for h in heads)  # no hop-by-hop in HTTP/2
    assert pipe.sent_eof


async def test_http2_request_head_becomes_an_h11_request_with_host():
    client = h2_client()
    seen: list[h11.Request] = []

    async def handler(ex: H2Exchange) -> None:
        assert ex.request is not None
        seen.append(ex.request)
        await send(ex, NO_STREAM, h11.Response(status_code=204, headers=[]))
        await send(ex, NO_STREAM, h11.EndOfMessage())

    pipe = Pipe()
    client.send_headers(
        1,
        [
            (":method", "GET"),
            (":path", "/x?y=1"),
            (":scheme", "http"),
            (":authority", "c:1"),
            ("x-a", "b"),
        ],
        end_stream=True,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(H2Server(pipe_stream(pipe), handler).run, client.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        await pipe.tx.aclose()
    (req,) = seen
    assert (req.method, req.target) == (b"GET", b"/x?y=1")
    assert (b"host", b"c:1") in req.headers and (b"x-a", b"b") in req.headers


async def test_http1_keep_alive_conversation_through_the_helpers():
    """The helpers the waypoint's HTTP/1.1 loop uses, against a real h11 client."""
    pipe = Pipe()
    client = h11.Connection(h11.CLIENT)
    wire = client.send(
        h11.Request(method="POST", target="/p", headers=[("host", "c"), ("content-length", "3")])
    )
    wire += client.send(h11.Data(data=b"abc")) + client.send(h11.EndOfMessage())
    await pipe.tx.send(wire)
    server = h11.Connection(h11.SERVER)
    stream: Any = pipe
    req = await next_event(server, stream)
    assert isinstance(req, h11.Request) and req.target == b"/p"
    data = await next_event(server, stream)
    assert isinstance(data, h11.Data) and data.data == b"abc"
    assert isinstance(await next_event(server, stream), h11.EndOfMessage)
    await send(server, stream, h11.Response(status_code=200, headers=[("content-length", "2")]))
    await send(server, stream, h11.Data(data=b"ok"))
    await send(server, stream, h11.EndOfMessage())
    client.receive_data(bytes(pipe.out))
    resp = client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == 200
    body = client.next_event()
    assert isinstance(body, h11.Data) and body.data == b"ok"
    server.start_next_cycle()  # keep-alive: the next request on the same stream
    client.next_event()
    client.start_next_cycle()
    await pipe.tx.send(
        client.send(h11.Request(method="GET", target="/2", headers=[("host", "c")]))
        + client.send(h11.EndOfMessage())
    )
    nxt = await next_event(server, stream)
    assert isinstance(nxt, h11.Request) and nxt.target == b"/2"
