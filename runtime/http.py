"""Minimal HTTP/1.1 over trio streams with h11, for the control plane (CA, admin, metrics).

Not for the data path: requests and responses are whole byte strings with a size limit.

Resource handling: one task per connection, owned by the serving nursery; each connection is
closed after the handler answers unless the client keeps it alive, and idles out after
`IDLE_TIMEOUT`. Error handling: a malformed request is answered 400 and the connection
closed; a handler exception is answered 500 (and logged), never crashing the server, and any
other failure of one connection ends that connection only (`veil.runtime.guard`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from veil.runtime import guard

log = logging.getLogger("veil.http")
IDLE_TIMEOUT = 30.0
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes
    peer: str

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        q = self.target.split("?", 1)[1] if "?" in self.target else ""
        pairs = (p.partition("=") for p in q.split("&") if p)
        return {k: v for k, _, v in pairs}


def _joined(fields: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Repeated fields joined with commas (RFC 9110 5.3), so none is lost; names lowercased."""
    out: dict[str, str] = {}
    for k, v in fields:
        name, value = k.decode().lower(), v.decode(errors="replace")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


# After a 101 (Switching Protocols): the connection's stream and the bytes already read past
# the request; the new protocol is the callee's until it returns.
Takeover = Callable[[trio.abc.Stream, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)
    takeover: Takeover | None = None  # with status 101: what runs the connection after it

    @classmethod
    def json(cls, status: int, doc: Any) -> Response:
        return cls(status, json.dumps(doc, indent=1).encode() + b"\n", "application/json")

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, max_body: int
) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.fail_after(IDLE_TIMEOUT):
                data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))
            if not data and request is None:
                return None
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


class _TooLarge(Exception):
    pass


class ResetConnection(Exception):
    """Raised by a handler to answer with a TCP reset instead of a response (test backends)."""


async def _send(conn: h11.Connection, stream: trio.abc.Stream, resp: Response) -> None:
    headers = [
        ("content-type", resp.content_type),
        ("content-length", str(len(resp.body))),
        *resp.headers.items(),
    ]
    out = conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
    out += conn.send(h11.Data(data=resp.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def handle_connection(
    stream: trio.abc.Stream, handler: Handler, peer: str, max_body: int = MAX_BODY
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        while True:
            try:
                got = await _read_request(conn, stream, max_body)
            except _TooLarge:
                await _send(
                    conn,
                    stream,
                    Response.json(413, {"error": "request too large", "code": "too_large"}),
                )
                return
            except h11.RemoteProtocolError as e:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(
                        conn,
                        stream,
                        Response.json(400, {"error": f"bad HTTP: {e}", "code": "bad_http"}),
                    )
                return
            if got is None:
                return
            req, body = got
            request = Request(
                method=req.method.decode(),
                target=req.target.decode(),
                headers=_joined(req.headers),
                body=body,
                peer=peer,
            )
            try:
                resp = await handler(request)
            except ResetConnection:
                if isinstance(stream, trio.SocketStream):
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                return
            except Exception:
                log.exception(
                    "handler failed for %s %s (this is a bug)", request.method, request.target
                )
                resp = Response.json(500, {"error": "internal error", "code": "internal"})
            if resp.status == 101 and resp.takeover is not None:
                switch = h11.InformationalResponse(status_code=101, headers=[*resp.headers.items()])
                await stream.send_all(conn.send(switch) or b"")
                await resp.takeover(stream, conn.trailing_data[0])
                return
            await _send(conn, stream, resp)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        h11.LocalProtocolError,
    ):
        return
    except ssl.SSLError as e:
        log.info("TLS error from %s: %s", peer, e)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError
            ):
                await stream.aclose()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    *,
    max_body: int = MAX_BODY,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `started()` reports the bound listeners (bind errors raise)."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def on_conn(stream: trio.SocketStream) -> None:
        await guard.guarded("http_connection", serve_one, stream, cleanup=stream.socket.close)

    async def serve_one(stream: trio.SocketStream) -> None:
        try:  # a client that resets right after the handshake is gone before we ask
            addr = stream.socket.getpeername()
        except OSError:
            await stream.aclose()
            return
        peer = f"{addr[0]}:{addr[1]}"
        s: trio.abc.Stream = stream
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_side=True)
            try:
                with trio.fail_after(10):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as e:
                log.info("TLS handshake with %s failed: %s", peer, e)
                await stream.aclose()
                return
            s = tls
        await handle_connection(s, handler, peer, max_body)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(on_conn, listeners, handler_nursery=nursery)


async def request(
    stream: trio.abc.Stream,
    method: str,
    target: str,
    host: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    max_body: int = 1 << 20,
) -> tuple[int, dict[str, str], bytes]:
    """One request on an open stream (client side); returns status, headers, body."""
    conn = h11.Connection(h11.CLIENT)
    hdrs = [
        ("host", host),
        ("content-length", str(len(body))),
        ("connection", "close"),
        *(headers or {}).items(),
    ]
    out = conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
    out += conn.send(h11.Data(data=body)) or b"" if body else b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
    status, resp_headers, data = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            resp_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > max_body:
                raise ValueError(f"response body larger than {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, resp_headers, bytes(data)
