"""The waypoint's HTTP/2 client to backends (`H2Client`) against h2's own server state machine:
heads both ways, flow control on big bodies, trailers (gRPC's status), resets, GOAWAY and
reuse of one connection for the next request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio

from veil.runtime.hbone.io import HboneError
from veil.waypoint.http2 import H2Client, H2Server
from veil.waypoint.messages import copy_body, grpc_message, local_reply, next_event, takes_trailers

Answer = Callable[["H2Backend", int, dict[str, str], bytes, list[tuple[str, str]]], None]


class H2Backend:
    """A stream whose far end is an HTTP/2 server (h2, server side): what the client sends
    is fed to it, and `answer` responds once a request has ended."""

    def __init__(self, answer: Answer) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.answer = answer
        self.out = bytearray(self.h2.data_to_send())
        self.heads: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.trailers: dict[int, list[tuple[str, str]]] = {}
        self.eof = False
        self.reset_code: int | None = None

    async def send(self, data: Any) -> None:
        for ev in self.h2.receive_data(bytes(data)):
            if isinstance(ev, h2.events.RequestReceived):
                self.heads[ev.stream_id] = dict(ev.headers)  # type: ignore[arg-type]
                self.bodies[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies[ev.stream_id] += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.trailers[ev.stream_id] = list(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id
                self.answer(
                    self, sid, self.heads[sid], bytes(self.bodies[sid]), self.trailers.get(sid, [])
                )
        self.out += self.h2.data_to_send()

    async def receive(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.out:
            if self.eof:
                return b""
            raise AssertionError("the client waits for bytes the backend never sends")
        data, self.out = bytes(self.out), bytearray()
        return data


def grpc_ok(b: H2Backend, sid: int, head: dict[str, str], body: bytes, _t: Any) -> None:
    b.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    for at in range(0, len(body), 16384):  # echoes the message
        b.h2.send_data(sid, body[at : at + 16384])
    b.h2.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "ok")], end_stream=True)


def request(target: str = "/echo.Echo/Say", **headers: str) -> h11.Request:
    hdrs = [("host", "echo:7070"), ("content-type", "application/grpc"), *headers.items()]
    return h11.Request(method="POST", target=target, headers=hdrs)


async def collect(client: H2Client, stream: Any) -> tuple[h11.Response, bytes, list[Any]]:
    head = await next_event(client, stream)
    assert isinstance(head, h11.Response), head
    body = bytearray()
    while True:
        ev = await next_event(client, stream)
        if isinstance(ev, h11.Data):
            body += ev.data
        else:
            assert isinstance(ev, h11.EndOfMessage), ev
            return head, bytes(body), list(ev.headers)


async def test_a_grpc_call_with_trailers_and_the_next_on_the_same_connection():
    backend: Any = H2Backend(grpc_ok)
    client = H2Client(backend)
    for n in range(2):
        await client.send(request(**{"x-call": str(n)}))
        await client.send(h11.Data(data=b"\0\0\0\0\2hi"))
        await client.send(h11.EndOfMessage())
        head, body, trailers = await collect(client, backend)
        assert head.status_code == 200 and body == b"\0\0\0\0\2hi"
        assert trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
        assert client.reusable()
        client.start_next_cycle()
    first, second = backend.heads[1], backend.heads[3]
    assert first[":authority"] == "echo:7070" and first[":path"] == "/echo.Echo/Say"
    assert first["te"] == "trailers" and "host" not in first  # gRPC needs te; Host is :authority
    assert (first["x-call"], second["x-call"]) == ("0", "1")


async def test_a_body_past_the_backends_window_waits_for_window_updates():
    backend: Any = H2Backend(grpc_ok)
    client = H2Client(backend)
    big = bytes(range(256)) * 1024  # 256 KiB, four times h2's default window
    await client.send(request())
    await client.send(h11.Data(data=big))
    await client.send(h11.EndOfMessage(headers=[("x-checksum", "42")]))
    _, body, _ = await collect(client, backend)
    assert body == big and backend.trailers[1] == [("x-checksum", "42")]


async def test_hop_by_hop_fields_never_reach_the_backend():
    backend: Any = H2Backend(grpc_ok)
    client = H2Client(backend)
    await client.send(request(**{"transfer-encoding": "chunked", "connection": "close"}))
    await client.send(h11.EndOfMessage())
    await collect(client, backend)
    assert not {"transfer-encoding", "connection", "host"} & set(backend.heads[1])


async def test_a_reset_stream_is_no_response():
    def reset(b: H2Backend, sid: int, *_: Any) -> None:
        b.h2.reset_stream(sid, 2)

    backend: Any = H2Backend(reset)
    client = H2Client(backend)
    await client.send(request())
    await client.send(h11.EndOfMessage())
    assert isinstance(await next_event(client, backend), h11.ConnectionClosed)


async def test_goaway_before_the_request_is_no_response_and_ends_reuse():
    def goaway(b: H2Backend, sid: int, *_: Any) -> None:
        b.h2.close_connection(last_stream_id=0)

    backend: Any = H2Backend(goaway)
    client = H2Client(backend)
    await client.send(request())
    await client.send(h11.EndOfMessage())
    assert isinstance(await next_event(client, backend), h11.ConnectionClosed)
    assert client.terminated and not client.reusable()


async def test_garbage_from_the_backend_is_an_error_not_a_response():
    class Garbage(H2Backend):
        async def receive(self) -> bytes:
            await trio.lowlevel.checkpoint()
            return b"HTTP/1.1 200 OK\r\n\r\n"

    backend: Any = Garbage(grpc_ok)
    client = H2Client(backend)
    await client.send(request())
    await client.send(h11.EndOfMessage())
    with pytest.raises(HboneError):
        await next_event(client, backend)
    assert not client.reusable()


async def test_the_backend_closing_mid_response_ends_the_body_early():
    def half(b: H2Backend, sid: int, *_: Any) -> None:
        b.h2.send_headers(sid, [(":status", "200")])
        b.h2.send_data(sid, b"part")
        b.eof = True

    backend: Any = H2Backend(half)
    client = H2Client(backend)
    await client.send(request())
    await client.send(h11.EndOfMessage())
    assert isinstance(await next_event(client, backend), h11.Response)
    assert (await next_event(client, backend)).data == b"part"
    assert isinstance(await next_event(client, backend), h11.ConnectionClosed)


def test_trailers_go_on_only_where_the_framing_carries_them():
    chunked = h11.Connection(h11.SERVER)
    chunked.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    chunked.next_event()
    chunked.next_event()
    chunked.send(h11.Response(status_code=200, headers=[]))
    assert takes_trailers(chunked)
    sized = h11.Connection(h11.SERVER)
    sized.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    sized.next_event()
    sized.next_event()
    sized.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
    assert not takes_trailers(sized)
    assert takes_trailers(H2Client(None))  # type: ignore[arg-type]


async def test_copy_body_passes_trailers_to_an_http2_side():
    backend: Any = H2Backend(grpc_ok)
    client = H2Client(backend)
    await client.send(request())
    await client.send(h11.EndOfMessage())
    head = await next_event(client, backend)
    assert head.status_code == 200

    class Sink:
        def __init__(self) -> None:
            self.events: list[Any] = []
            self.conn = H2Client(None)  # type: ignore[arg-type]

        async def send(self, ev: Any) -> None:
            self.events.append(ev)

        async def flush(self) -> None:
            pass

    sink = Sink()
    await copy_body(client, backend, sink, "gone")  # type: ignore[arg-type]
    assert sink.events[-1].headers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]


def test_grpc_messages_are_percent_encoded_as_grpc_says():
    assert grpc_message("RBAC: access denied (a/b: rule 1)") == "RBAC: access denied (a/b: rule 1)"
    assert grpc_message("100% über\n") == "100%25 %C3%BCber%0A"


async def test_the_waypoints_own_answer_to_a_grpc_call_is_one_trailers_only_headers_frame():
    """A gRPC client reads its status from trailers; an answer without a message must be
    "Trailers-Only" (one HEADERS frame ending the stream), as Envoy sends its own replies."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    client.initiate_connection()
    sid = client.get_next_available_stream_id()
    head = [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/p.S/M")]
    client.send_headers(sid, [*head, ("content-type", "application/grpc")], end_stream=True)

    class Wire:
        def __init__(self) -> None:
            self.got = bytearray()

        async def receive(self) -> bytes:
            await trio.sleep_forever()
            return b""

        async def send(self, data: Any) -> None:
            self.got += data

        async def send_eof(self) -> None:
            pass

    wire = Wire()

    async def answer(ex: Any) -> None:
        await local_reply(ex, wire, 403, "RBAC: access denied")  # type: ignore[arg-type]

    server = H2Server(wire, answer)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, client.data_to_send())
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    events = client.receive_data(bytes(wire.got))
    (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert resp.stream_ended is not None  # the same frame ended the stream
    fields: dict[Any, Any] = dict(resp.headers or [])
    assert fields[":status"] == "200" and fields["grpc-status"] == "7"  # PERMISSION_DENIED
    assert fields["grpc-message"] == "RBAC: access denied"
