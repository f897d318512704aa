"""A small HTTP/1.1 echo workload for examples and tests (`veil echo`).

Answers every request with JSON naming the pod that served it (from the downward-API-like
environment the lab sets), the client address it saw and the request headers, so a test can
tell which pod answered and whether the source address survived the path. For resilience
tests and demos: `/status/<code>` answers with that status code, `/delay/<ms>` answers after
that long, and `ECHO_FAIL=<code>` in the environment makes the pod answer every request with
that status (a broken replica); `ECHO_LOG_REQUESTS=1` logs each request. As Gateway API's
echo-basic (for the acceptance suite): `?delay=<duration>` (`500ms`, `1s`) waits that long,
and `?uuid=<id>&succeedAfter=<n>` fails the first n requests with that uuid, with
`?responseCode=<code>` or else by resetting the connection. A WebSocket handshake
(`Upgrade: websocket`) is accepted and every text or binary message is sent back;
`--tcp-port` adds a raw TCP echo that sends the pod's name first, then every byte back.
`--grpc-port` adds HTTP/2 (prior knowledge, h2c): gRPC calls of Istio's echo service
(`proto.EchoTestService/Echo`, answered with `Hostname=<pod>` lines as Istio's echo does,
the status in trailers; echo-basic's `GrpcEcho/Echo` and `/EchoTwo` answered alike), other
gRPC methods UNIMPLEMENTED, and plain HTTP/2 requests answered like HTTP/1.1 ones (with
`x-echo-protocol: HTTP/2.0`). `--ext-authz-port` adds the HTTP check of Istio's sample
ext_authz server (samples/extauthz): a request with `x-ext-authz: allow` is allowed (200),
any other denied (403 with the sample's body), both with its `x-ext-authz-check-*` headers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import struct
import sys
import traceback
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

from veil.runtime import http

MAX_BODY = 64 * 1024 * 1024  # uploads in tests; the body is counted, not kept


def describe(req: http.Request) -> dict[str, object]:
    return {
        "pod": os.environ.get("POD_NAME", ""),
        "namespace": os.environ.get("POD_NAMESPACE", ""),
        "node": os.environ.get("NODE_NAME", ""),
        "podIP": os.environ.get("POD_IP", ""),
        "client": req.peer,
        "method": req.method,
        "path": req.target,
        "headers": dict(req.headers),
        "bodyBytes": len(req.body),
    }


def status_for(target: str) -> int:
    parts = target.split("?", maxsplit=1)[0].split("/")
    if len(parts) == 3 and parts[1] == "status" and parts[2].isdigit():
        code = int(parts[2])
        if 200 <= code <= 599:
            return code
    return 200


def delay_for(target: str) -> float:
    parts = target.split("?", maxsplit=1)[0].split("/")
    if len(parts) == 3 and parts[1] == "delay" and parts[2].isdigit():
        return min(int(parts[2]), 60_000) / 1000
    return 0.0


DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)")
UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0}


def query_delay(target: str) -> float:
    """`?delay=1s` / `?delay=500ms` (a Go duration, as echo-basic reads it), at most 60 s."""
    _, _, q = target.partition("?")
    value = parse_qs(q).get("delay", [""])[0]
    m = DURATION.fullmatch(value)
    return min(float(m[1]) * UNIT[m[2]], 60.0) if m else 0.0


ATTEMPTS: dict[str, int] = {}


def simulated_failure(target: str) -> int | None:
    """The status to fail this try with (0: reset the connection), or None to answer."""
    _, _, q = target.partition("?")
    args = parse_qs(q)
    uuid, after = args.get("uuid", [""])[0], args.get("succeedAfter", [""])[0]
    if not uuid or not after.isdigit():
        return None
    if ATTEMPTS.get(uuid, 0) >= int(after):
        return None
    ATTEMPTS[uuid] = ATTEMPTS.get(uuid, 0) + 1
    if len(ATTEMPTS) > 10_000:  # bounded: forget the oldest
        del ATTEMPTS[next(iter(ATTEMPTS))]
    code = args.get("responseCode", [""])[0]
    return int(code) if code.isdigit() and 200 <= int(code) <= 599 else 0


LOG_REQUESTS = os.environ.get("ECHO_LOG_REQUESTS") == "1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
WS_MAX_MESSAGE = 1 << 20


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def ws_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete client frames taken off the front of `buf` (opcode, unmasked payload), sans-IO.
    ValueError for what RFC 6455 forbids a client (unmasked frames) or past the size limit."""
    out = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            (n,), at = struct.unpack("!H", buf[2:4]), 4
        elif n == 127:
            if len(buf) < 10:
                break
            (n,), at = struct.unpack("!Q", buf[2:10]), 10
        if not b1 & 0x80:
            raise ValueError("client frames must be masked")
        if n > WS_MAX_MESSAGE:
            raise ValueError("frame too large")
        if len(buf) < at + 4 + n:
            break
        mask = buf[at : at + 4]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buf[at + 4 : at + 4 + n]))
        del buf[: at + 4 + n]
        out.append((b0 & 0x0F, payload))
    return out


def ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


async def ws_echo(stream: trio.abc.Stream, leftover: bytes) -> None:
    """Echo text and binary messages back, answer pings and close: one unfragmented frame each."""
    buf = bytearray(leftover)
    while True:
        try:
            frames = ws_frames(buf)
        except ValueError:
            await stream.send_all(ws_frame(0x8, struct.pack("!H", 1002)))
            return
        for opcode, payload in frames:
            if opcode in (0x1, 0x2):
                await stream.send_all(ws_frame(opcode, payload))
            elif opcode == 0x9:
                await stream.send_all(ws_frame(0xA, payload))
            elif opcode == 0x8:
                await stream.send_all(ws_frame(0x8, payload[:2]))
                return
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data


async def handle(req: http.Request) -> http.Response:
    if LOG_REQUESTS:  # tests count mirrored requests in the pod's log, as echo-basic's
        print(f"echo: {req.method} {req.target} from {req.peer}", file=sys.stderr, flush=True)
    if req.headers.get("upgrade", "").lower() == "websocket" and "sec-websocket-key" in req.headers:
        accept = websocket_accept(req.headers["sec-websocket-key"])
        headers = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-accept": accept}
        return http.Response(101, headers=headers, takeover=ws_echo)
    if wait := delay_for(req.target) or query_delay(req.target):
        await trio.sleep(wait)
    if (failure := simulated_failure(req.target)) is not None:
        if failure == 0:
            raise http.ResetConnection
        return http.Response.json(failure, {"attempt": "failed on purpose"})
    fail = os.environ.get("ECHO_FAIL", "")
    status = int(fail) if fail.isdigit() else status_for(req.target)
    doc = http.Response.json(status, describe(req))
    return http.Response(
        doc.status, doc.body, doc.content_type, {"x-served-by": os.environ.get("POD_NAME", "echo")}
    )


async def tcp_echo(stream: trio.SocketStream) -> None:
    """Raw TCP: `<pod> ` once the first bytes come, then every byte back as it came."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            prefix = os.environ.get("POD_NAME", "echo").encode() + b" "
            while data := await stream.receive_some(65536):
                await stream.send_all(prefix + data)
                prefix = b""


# -- gRPC and HTTP/2 ---------------------------------------------------------------------------

GRPC_ECHO = "/proto.EchoTestService/Echo"  # Istio's echo service, as Gateway API's client calls it
# Gateway API's echo-basic gRPC service: Echo and EchoTwo answered, EchoThree not implemented
GRPC_BASIC = "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/"
GRPC_METHODS = frozenset({GRPC_ECHO, f"{GRPC_BASIC}Echo", f"{GRPC_BASIC}EchoTwo"})
GRPC_MAX_MESSAGE = 4 << 20


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def proto_string_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def proto_first_string(message: bytes, number: int) -> bytes:
    """Field `number` (a string) of a protobuf message, b"" if absent; ValueError if garbled."""
    at = 0
    while at < len(message):
        key, at = _read_varint(message, at)
        wire = key & 7
        if wire == 0:
            _, at = _read_varint(message, at)
        elif wire == 2:
            n, at = _read_varint(message, at)
            if at + n > len(message):
                raise ValueError("truncated field")
            if key >> 3 == number:
                return message[at : at + n]
            at += n
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
    return b""


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    n = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        n |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return n, at
    raise ValueError("bad varint")


def grpc_messages(body: bytes) -> list[bytes]:
    """The length-prefixed messages of a gRPC body (uncompressed only)."""
    out, at = [], 0
    while at < len(body):
        if len(body) - at < 5 or body[at] != 0:
            raise ValueError("bad or compressed gRPC message")
        n = int.from_bytes(body[at + 1 : at + 5], "big")
        if n > GRPC_MAX_MESSAGE or at + 5 + n > len(body):
            raise ValueError("gRPC message too large or truncated")
        out.append(body[at + 5 : at + 5 + n])
        at += 5 + n
    return out


def grpc_echo(head: dict[str, str], body: bytes, peer: str) -> tuple[bytes, int, str]:
    """Istio's EchoTestService/Echo (and echo-basic's GrpcEcho Echo / EchoTwo, answered the
    same way): (response body, grpc-status, grpc-message)."""
    if head.get(":path") not in GRPC_METHODS:
        return b"", 12, f"unknown method {head.get(':path')}"  # UNIMPLEMENTED
    try:
        messages = grpc_messages(body)
        said = proto_first_string(messages[0], 1) if messages else b""
    except ValueError as e:
        return b"", 3, str(e)  # INVALID_ARGUMENT
    lines = [
        f"ServiceVersion={os.environ.get('POD_VERSION', '')}",
        "ServicePort=7070",
        f"Host={head.get(':authority', '')}",
        f"Hostname={os.environ.get('POD_NAME', '')}",
        "Method=POST",
        "Proto=GRPC",
        f"IP={peer.rsplit(':', 1)[0]}",
        "StatusCode=200",
        f"Echo={said.decode(errors='replace')}",
        *(f"RequestHeader={k}:{v}" for k, v in head.items() if not k.startswith(":")),
    ]
    reply = proto_string_field(1, "\n".join(lines).encode())
    return b"\0" + len(reply).to_bytes(4, "big") + reply, 0, ""


CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError)


class H2cConnection:
    """One HTTP/2 (prior knowledge) client connection: every request answered once it ended."""

    def __init__(self, stream: trio.SocketStream, peer: str) -> None:
        self.stream, self.peer = stream, peer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.lock = trio.Lock()
        self.heads: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytearray] = {}

    async def flush(self) -> None:
        async with self.lock:
            if out := self.h2.data_to_send():
                await self.stream.send_all(out)

    async def run(self) -> None:
        """Until the client goes (or breaks HTTP/2); never raises for what a client does, so
        one connection cannot take the echo down."""
        async with trio.open_nursery() as nursery:
            with contextlib.suppress(*CLIENT_GONE):
                self.h2.initiate_connection()
                await self.flush()
                while data := await self.stream.receive_some(65536):
                    for ev in self.h2.receive_data(data):
                        self.event(ev, nursery)
                    await self.flush()
            nursery.cancel_scope.cancel()

    def event(self, ev: Any, nursery: trio.Nursery) -> None:
        sid = getattr(ev, "stream_id", 0)
        if isinstance(ev, h2.events.RequestReceived):
            self.heads[sid] = {str(k): str(v) for k, v in ev.headers or []}
            self.bodies[sid] = bytearray()
        elif isinstance(ev, h2.events.DataReceived) and sid in self.bodies:
            self.bodies[sid] += ev.data or b""
            self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            if len(self.bodies[sid]) > MAX_BODY:
                self.h2.reset_stream(sid, 11)  # ENHANCE_YOUR_CALM
                self.heads.pop(sid), self.bodies.pop(sid)
        elif isinstance(ev, h2.events.StreamEnded) and sid in self.heads:
            nursery.start_soon(self.answer, sid, self.heads.pop(sid), bytes(self.bodies.pop(sid)))
        elif isinstance(ev, h2.events.StreamReset):
            self.heads.pop(sid, None), self.bodies.pop(sid, None)

    async def answer(self, sid: int, head: dict[str, str], body: bytes) -> None:
        try:
            await self._answer(sid, head, body)
        except CLIENT_GONE:
            return
        except Exception as e:  # ResetConnection (on purpose) or a bug: this stream only
            if not isinstance(e, http.ResetConnection):
                traceback.print_exc()
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(sid, 2)
            with contextlib.suppress(*CLIENT_GONE):
                await self.flush()

    async def _answer(self, sid: int, head: dict[str, str], body: bytes) -> None:
        if LOG_REQUESTS:
            print(
                f"echo: h2 {head.get(':method')} {head.get(':path')}", file=sys.stderr, flush=True
            )
        trailers: list[tuple[str, str]] = []
        if head.get("content-type", "").startswith("application/grpc"):
            data, code, message = grpc_echo(head, body, self.peer)
            headers = [(":status", "200"), ("content-type", "application/grpc")]
            trailers = [("grpc-status", str(code))] + (
                [("grpc-message", message)] if message else []
            )
        else:
            req = http.Request(
                method=head.get(":method", "GET"),
                target=head.get(":path", "/"),
                headers={
                    "host": head.get(":authority", ""),
                    **{k: v for k, v in head.items() if not k.startswith(":")},
                },
                body=body,
                peer=self.peer,
            )
            resp = await handle(req)
            data = resp.body
            headers = [
                (":status", str(resp.status)),
                ("content-type", resp.content_type),
                ("content-length", str(len(data))),
                ("x-echo-protocol", "HTTP/2.0"),
                *resp.headers.items(),
            ]
        with contextlib.suppress(h2.exceptions.ProtocolError):
            async with self.lock:
                self.h2.send_headers(sid, headers, end_stream=not data and not trailers)
                for at in range(0, len(data), 16384):
                    self.h2.send_data(sid, data[at : at + 16384])
                if trailers:
                    self.h2.send_headers(sid, trailers, end_stream=True)
                elif data:
                    self.h2.end_stream(sid)
            await self.flush()


async def h2c_echo(stream: trio.SocketStream) -> None:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return
    async with stream:
        await H2cConnection(stream, f"{addr[0]}:{addr[1]}").run()


EXT_AUTHZ_DENY_BODY = "denied by ext_authz for not found header `x-ext-authz: allow` in the request"


async def ext_authz_check(req: http.Request) -> http.Response:
    """Istio's sample ext_authz server's HTTP check (samples/extauthz/cmd/extauthz)."""
    seen = f"{req.method} {req.headers.get('host', '')}{req.target}, headers: {sorted(req.headers)}"
    if LOG_REQUESTS:
        print(f"echo: ext_authz check {seen}", file=sys.stderr, flush=True)
    allowed = req.headers.get("x-ext-authz") == "allow"
    headers = {
        "x-ext-authz-check-result": "allowed" if allowed else "denied",
        "x-ext-authz-additional-header-override": req.headers.get(
            "x-ext-authz-additional-header-override", ""
        ),
        "x-ext-authz-check-received": seen,
    }
    if allowed:
        return http.Response(200, headers=headers)
    return http.Response(403, EXT_AUTHZ_DENY_BODY.encode(), headers=headers)


async def serve(
    port: int,
    host: str = "0.0.0.0",
    tcp_port: int | None = None,
    grpc_port: int | None = None,
    ext_authz_port: int | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        if tcp_port:
            nursery.start_soon(partial(trio.serve_tcp, tcp_echo, tcp_port, host=host))
        if grpc_port:
            nursery.start_soon(partial(trio.serve_tcp, h2c_echo, grpc_port, host=host))
        if ext_authz_port:
            nursery.start_soon(http.serve, ext_authz_check, host, ext_authz_port)
        await http.serve(handle, host, port, max_body=MAX_BODY)


def main(
    port: int,
    host: str = "0.0.0.0",
    tcp_port: int | None = None,
    grpc_port: int | None = None,
    ext_authz_port: int | None = None,
) -> None:
    extra = "".join(
        f" and {what} {p}"
        for what, p in (("TCP", tcp_port), ("gRPC/h2c", grpc_port), ("ext_authz", ext_authz_port))
        if p
    )
    print(
        f"echo: pod {os.environ.get('POD_NAME', '?')} listening on {host}:{port}{extra}",
        file=sys.stderr,
        flush=True,
    )
    trio.run(serve, port, host, tcp_port, grpc_port, ext_authz_port)
