"""Relays: bytes both ways between two connections, with half-close and reset carried over.

A FIN on one side becomes a FIN (END_STREAM / shutdown(SHUT_WR)) on the other, and data
already in flight is still delivered; a reset on one side becomes a reset on the other
(RST_STREAM / SO_LINGER 0 close). Reads are 256 KiB, and payload bytes are never touched in
Python beyond being passed along.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

import trio

from agent.hbone.io import HboneError, Stream

READ_SIZE = 256 * 1024


@dataclass
class Transferred:
    """Bytes each way: `up` from the accepting side's client, `down` back to it."""

    up: int = 0
    down: int = 0


def abort(sock: trio.socket.SocketType) -> None:
    """Close with a TCP RST (the peer sees 'connection reset', not a clean end)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def relay_stream(tcp: trio.SocketStream, stream: Stream) -> Transferred:
    """TCP <-> HBONE stream until both directions ended (or one side reset)."""
    moved = Transferred()
    reset = False

    async def up() -> None:
        nonlocal reset
        try:
            while data := await tcp.receive_some(READ_SIZE):
                await stream.send(data)
                moved.up += len(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reset = True
            stream.reset()
            nursery.cancel_scope.cancel()
        except HboneError:
            reset = True
            nursery.cancel_scope.cancel()

    async def down() -> None:
        nonlocal reset
        try:
            while data := await stream.receive():
                await tcp.send_all(data)
                moved.down += len(data)
            tcp.socket.shutdown(socket.SHUT_WR)
        except HboneError:
            reset = True
            nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            reset = True
            stream.reset()
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(up)
            nursery.start_soon(down)
    finally:
        stream.close()
        if reset:
            abort(tcp.socket)
        else:
            tcp.socket.close()
    return moved


async def relay_tcp(a: trio.SocketStream, b: trio.SocketStream) -> Transferred:
    """TCP <-> TCP (passthrough and the plaintext inbound path)."""
    moved = Transferred()
    reset = False

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, forward: bool) -> None:
        nonlocal reset
        try:
            while data := await src.receive_some(READ_SIZE):
                await dst.send_all(data)
                if forward:
                    moved.up += len(data)
                else:
                    moved.down += len(data)
            dst.socket.shutdown(socket.SHUT_WR)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            reset = True
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, True)
            nursery.start_soon(pump, b, a, False)
    finally:
        for s in (a, b):
            if reset:
                abort(s.socket)
            else:
                s.socket.close()
    return moved
