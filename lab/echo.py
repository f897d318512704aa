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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import struct
import sys
from functools import partial
from urllib.parse import parse_qs

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


async def serve(port: int, host: str = "0.0.0.0", tcp_port: int | None = None) -> None:
    async with trio.open_nursery() as nursery:
        if tcp_port:
            nursery.start_soon(partial(trio.serve_tcp, tcp_echo, tcp_port, host=host))
        await http.serve(handle, host, port, max_body=MAX_BODY)


def main(port: int, host: str = "0.0.0.0", tcp_port: int | None = None) -> None:
    tcp = f" and TCP {tcp_port}" if tcp_port else ""
    print(
        f"echo: pod {os.environ.get('POD_NAME', '?')} listening on {host}:{port}{tcp}",
        file=sys.stderr,
        flush=True,
    )
    trio.run(serve, port, host, tcp_port)
