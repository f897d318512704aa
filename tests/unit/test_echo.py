"""`veil echo`, the lab's test backend: the hooks the acceptance suite relies on (echo-basic's
query parameters, a WebSocket echo), pure parts and one real connection."""

from __future__ import annotations

import functools
import json
import socket
import struct
import sys
from pathlib import Path

import pytest
import trio

from veil.lab import echo
from veil.runtime import http

WSCLIENT = str(Path(__file__).parent.parent / "support" / "wsclient.py")
GRPCCLIENT = str(Path(__file__).parent.parent / "support" / "grpcclient.py")


@pytest.mark.parametrize(
    ("target", "seconds"),
    [("/?delay=1s", 1.0), ("/x?delay=500ms", 0.5), ("/?delay=1.5s", 1.5), ("/?delay=9h", 0.0)],
)
def test_delay_takes_go_durations(target, seconds):
    assert echo.query_delay(target) == seconds


def test_succeed_after_fails_the_first_tries_of_each_uuid():
    echo.ATTEMPTS.clear()
    t = "/retry?responseCode=503&succeedAfter=2&uuid=a"
    assert [echo.simulated_failure(t) for _ in range(3)] == [503, 503, None]
    assert echo.simulated_failure("/r?succeedAfter=1&uuid=b") == 0  # 0: reset the connection
    assert echo.simulated_failure("/r?succeedAfter=1") is None  # no uuid: a normal answer


def masked(opcode: int, payload: bytes, mask: bytes = b"abcd") -> bytes:
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = struct.pack("!BB", 0x80 | opcode, 0x80 | n) if n < 126 else b""
    if n >= 126:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    return head + mask + body


def test_websocket_frames_split_anywhere():
    wire = masked(0x1, b"hello") + masked(0x2, b"\x00" * 300)
    buf, got = bytearray(), []
    for i in range(len(wire)):
        buf.append(wire[i])
        got += echo.ws_frames(buf)
    assert got == [(0x1, b"hello"), (0x2, b"\x00" * 300)] and not buf


def test_unmasked_client_frames_are_refused():
    with pytest.raises(ValueError, match="masked"):
        echo.ws_frames(bytearray(b"\x81\x05hello"))


def test_a_real_websocket_conversation():
    """The standard-library client of the lab tests against the echo server, on loopback."""

    async def main() -> str:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(http.serve, echo.handle, "127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            argv = [sys.executable, WSCLIENT, f"127.0.0.1:{port}", "/ws", "one", "y" * 70_000]
            done = await trio.run_process(argv, capture_stdout=True, check=True)
            nursery.cancel_scope.cancel()
        return done.stdout.decode()

    got = json.loads(trio.run(main))
    assert got["status"] == 101 and got["accept_ok"]
    assert got["echoed"] == ["one", "y" * 70_000]


def grpc_body(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


def test_the_grpc_echo_answers_istios_and_echo_basics_methods():
    head = {":path": echo.GRPC_ECHO, ":authority": "echo:7070", "x-md": "v"}
    body, code, _ = echo.grpc_echo(head, grpc_body(echo.proto_string_field(1, b"hi")), "10.0.0.1:5")
    (reply,) = echo.grpc_messages(body)
    lines = echo.proto_first_string(reply, 1).decode().split("\n")
    assert code == 0 and "Echo=hi" in lines and "IP=10.0.0.1" in lines
    assert "RequestHeader=x-md:v" in lines and "Host=echo:7070" in lines
    for method in ("Echo", "EchoTwo"):
        assert echo.grpc_echo({":path": echo.GRPC_BASIC + method}, b"", "p")[1] == 0
    assert echo.grpc_echo({":path": echo.GRPC_BASIC + "EchoThree"}, b"", "p")[1] == 12


@pytest.mark.parametrize(
    "body", [b"\1\0\0\0\1x", b"\0\0\0\0\x09x", b"\0\0\0", grpc_body(b"\x0a\x09short")]
)
def test_a_garbled_grpc_request_is_invalid_argument(body):
    assert echo.grpc_echo({":path": echo.GRPC_ECHO}, body, "p")[1] == 3


def test_protobuf_varints_round_trip():
    for n in (0, 1, 127, 128, 300, 1 << 40):
        field = echo.proto_string_field(1, b"x" * (n % 1000))
        assert echo.proto_first_string(field, 1) == b"x" * (n % 1000)
        assert echo._read_varint(echo.varint(n), 0) == (n, len(echo.varint(n)))


def test_clients_that_reset_or_break_http2_never_take_the_grpc_port_down():
    """A connection reset mid-call and HTTP/1.1 instead of the HTTP/2 preface end that
    connection only; grpcio then still gets its answers (the acceptance suite once lost an
    echo pod to a client that went away)."""

    async def main() -> list[str]:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, echo.h2c_echo, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            port = listeners[0].socket.getsockname()[1]
            for junk in (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\4\1\0\0\0\0\0",
                b"GET / HTTP/1.1\r\n\r\n",
            ):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(junk)
                s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await s.aclose()  # a reset, with a request half sent
            argv = [sys.executable, GRPCCLIENT, f"127.0.0.1:{port}", "2"]
            done = await trio.run_process(argv, capture_stdout=True, check=True)
            nursery.cancel_scope.cancel()
        answers: list[str] = json.loads(done.stdout)
        return answers

    got = trio.run(main)
    assert len(got) == 2 and not [a for a in got if a.startswith("error")], got
