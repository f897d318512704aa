"""Moving HTTP messages between a stream and an h11 connection (or an HTTP/2 exchange, which
speaks the same events): the next event, sending, coalesced writing, copying a body, the
waypoint's own replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h11

from veil.runtime.hbone.io import HboneError, Stream
from veil.waypoint.http2 import H2Exchange, H2Messages

COALESCE = 64 * 1024


class HttpError(Exception):
    """A request ends with a status of the waypoint's own (or, once a response has begun,
    with the stream broken off)."""

    def __init__(self, status: int, flags: str, why: str) -> None:
        super().__init__(why)
        self.status, self.flags = status, flags


async def next_event(conn: Any, stream: Stream) -> Any:
    """The next h11 event, feeding it stream bytes as it needs them (an HTTP/2 exchange
    produces the same events itself)."""
    if isinstance(conn, H2Messages):
        return await conn.next_event()
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        try:
            data = await stream.receive()
        except HboneError:
            data = b""
        conn.receive_data(bytes(data))


async def send(conn: Any, stream: Stream, event: Any) -> None:
    if isinstance(conn, H2Messages):
        await conn.send(event)
        return
    data = conn.send(event)
    if data:
        await stream.send(data)


class Writer:
    """One message's output towards a stream, sent only when the proxy is about to wait for
    input, at the end of the message, or past 64 KiB: a small response leaves as one TLS
    record and one DATA frame instead of three (head, body, end)."""

    def __init__(self, conn: Any, stream: Stream) -> None:
        self.conn, self.stream = conn, stream
        self.buf = bytearray()

    async def send(self, event: Any) -> None:
        if isinstance(self.conn, H2Messages):
            await self.conn.send(event)
            return
        self.buf += self.conn.send(event) or b""
        if isinstance(event, h11.EndOfMessage) or len(self.buf) >= COALESCE:
            await self.flush()

    async def flush(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            await self.stream.send(data)


async def next_event_then(conn: Any, stream: Stream, pending: Writer) -> Any:
    """`next_event`, flushing `pending` before it would block on the network."""
    if isinstance(conn, H2Messages):
        await pending.flush()
        return await conn.next_event()
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        await pending.flush()
        try:
            data = await stream.receive()
        except HboneError:
            data = b""
        conn.receive_data(bytes(data))


async def copy_body(  # noqa: PLR0917
    conn: Any, stream: Stream, out: Writer, why: str, status: int = 400, flags: str = "DC"
) -> int:
    """Stream one message body from `conn` into `out` (sent whenever the source makes us
    wait); the bytes copied. A message that ends early: HttpError(status, flags, why)."""
    copied = 0
    while True:
        ev = await next_event_then(conn, stream, out)
        if isinstance(ev, h11.Data):
            copied += len(ev.data)
            await out.send(h11.Data(data=ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            trailers = list(ev.headers) if takes_trailers(out.conn) else []
            await out.send(h11.EndOfMessage(headers=trailers))
            return copied
        else:
            raise HttpError(status, flags, why)


def takes_trailers(conn: Any) -> bool:
    """Whether a message being sent can end with trailer fields: over HTTP/2, or an h11
    message with chunked framing (h11 refuses them after a Content-Length body)."""
    if isinstance(conn, H2Messages):
        return True
    return type(getattr(conn, "_writer", None)).__name__ == "ChunkedWriter"


async def read_body(down: Any, stream: Stream) -> bytes:
    """A whole (small) request body."""
    chunks = []
    while True:
        ev = await next_event(down, stream)
        if isinstance(ev, h11.Data):
            chunks.append(bytes(ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise HttpError(400, "DC", "the client went away during the request")


async def drain_request(down: Any, stream: Stream) -> None:
    """Read the rest of a request we answered early, so the connection can go on."""
    while down.their_state is h11.SEND_BODY:
        ev = await next_event(down, stream)
        if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
            break


# gRPC's mapping of HTTP statuses (grpc/doc/http-grpc-status-mapping.md), as Envoy applies it
# to its own replies to gRPC requests: 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
# 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, 400 INTERNAL, else UNKNOWN.
GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def grpc_message(why: str) -> str:
    """grpc-message's percent-encoding: printable ASCII but `%` as it is, the rest %XX."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in why.encode())


def is_grpc(down: Any) -> bool:
    """A gRPC call (over HTTP/2): the waypoint's own answers to it are gRPC statuses."""
    req = getattr(down, "request", None)
    return isinstance(down, H2Exchange) and any(
        n.lower() == b"content-type" and v.startswith(b"application/grpc")
        for n, v in (req.headers if req is not None else ())
    )


async def local_reply(  # noqa: PLR0917
    down: Any,
    stream: Stream,
    status: int,
    why: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> None:
    """A response of the waypoint's own; if the client is gone, its stream is reset (an
    HTTP/2 exchange resets only its own HTTP/2 stream, never the connection's). A gRPC call
    gets it as a gRPC status (HTTP 200, `grpc-status` and `grpc-message` in trailers), as
    Envoy answers them: a gRPC client reads no HTTP status."""
    if body is None:
        body, headers = f"{why}\n".encode(), [("content-type", "text/plain"), *headers]
    try:
        if is_grpc(down):
            await send(
                down,
                stream,
                h11.Response(status_code=200, headers=[("content-type", "application/grpc")]),
            )
            code = str(GRPC_STATUS.get(status, 2))
            trailers = [("grpc-status", code), ("grpc-message", grpc_message(why))]
            await send(down, stream, h11.EndOfMessage(headers=trailers))
            return
        await send(
            down,
            stream,
            h11.Response(
                status_code=status, headers=[*headers, ("content-length", str(len(body)))]
            ),
        )
        await send(down, stream, h11.Data(data=body))
        await send(down, stream, h11.EndOfMessage())
    except (h11.ProtocolError, HboneError):
        if not isinstance(down, H2Exchange):
            stream.reset()


async def redirect(down: Any, stream: Stream, status: int, location: str) -> None:
    await drain_request(down, stream)
    await send(
        down,
        stream,
        h11.Response(status_code=status, headers=[("location", location), ("content-length", "0")]),
    )
    await send(down, stream, h11.EndOfMessage())


async def relay(src: Stream, dst: Stream) -> int:
    """Copy one HBONE stream into another until end of stream (then half-close) or reset;
    the bytes moved."""
    moved = 0
    try:
        while True:
            data = await src.receive()
            if not data:
                await dst.send_eof()
                return moved
            moved += len(data)
            await dst.send(data)
    except HboneError:
        dst.reset()
        src.reset()
        return moved
