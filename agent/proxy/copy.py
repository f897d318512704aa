"""Relays: bytes both ways between two connections, with half-close and reset carried over.

A FIN on one side becomes a FIN (END_STREAM / shutdown(SHUT_WR)) on the other and data already
in flight is still delivered; a reset on one side becomes a reset on the other (RST_STREAM /
SO_LINGER 0 close). Payload bytes are passed along, never inspected.

The data path uses plain non-blocking sockets with `wait_readable`/`wait_writable` rather than
trio's SocketStream: a trio socket operation adds scheduler checkpoints, and on a proxied round
trip those passes, not the bytes, were the cost (see bench/README.md). For the same reason the
HBONE reader hands received DATA straight to the app's socket (`Stream.sink`) when the socket
takes it, so the relay's down task only wakes when the socket is full.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from veil.runtime.hbone.io import DrainOutcome, HboneError, Stream

READ_SIZE = 256 * 1024
FAIRNESS = 16  # operations that did not wait before a task yields anyway


@dataclass
class Transferred:
    """Bytes each way: `up` from the accepting side's client, `down` back to it."""

    up: int = 0
    down: int = 0


def abort(sock: socket.socket | trio.socket.SocketType) -> None:
    """Close with a TCP RST (the peer sees 'connection reset', not a clean end)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def plain(sock: socket.socket) -> socket.socket:
    """Non-blocking with TCP_NODELAY. The agent's own sockets (accepted by `serve`, made by
    `connect`) come that way already: only a blocking socket is set up here."""
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Reader:
    """recv() that waits only when nothing is ready (and yields every FAIRNESS reads).

    After a short read the socket is most likely empty, so the next call waits first instead
    of trying a recv that fails; `before_wait` runs before every wait (e.g. to send output a
    caller held back to coalesce it with what it reads next).
    """

    def __init__(self, sock: socket.socket, before_wait: Callable[[], None] | None = None) -> None:
        self.sock, self._streak = sock, 0
        self.more = True  # try a recv before waiting (the caller may set it)
        self.before_wait = before_wait

    async def recv(self, n: int = READ_SIZE) -> bytes:
        self._streak += 1
        if self._streak >= FAIRNESS:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            if self.more:
                try:
                    data = self.sock.recv(n)
                except BlockingIOError:
                    pass
                else:
                    self.more = len(data) == n
                    return data
            self._streak = 0
            if self.before_wait is not None:
                self.before_wait()
            await trio.lowlevel.wait_readable(self.sock)
            self.more = True


async def sendall(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def relay_stream(sock: socket.socket, stream: Stream, *, answers: bool = True) -> Transferred:
    """TCP <-> HBONE stream until both directions ended (or one side reset).

    `answers`: the app answers requests (the server side), so after each read one more recv
    is tried at once: an app that writes and closes has its FIN leave with its data. A
    client app (the outbound side) waits for the answer after writing, and that recv would
    only fail; there it is the first recv that is tried at once (below).

    This task carries the app's bytes up; the HBONE reader writes the peer's bytes straight
    into the app's socket (`Stream.sink`) and passes END_STREAM on as a FIN. Only when the
    app's socket pushes back does a drain task take over that direction, in the tunnel's
    nursery and under a cancel scope this relay holds: a connection costs no nursery of its
    own (opening one is ~14 us of scheduling, per side and connection).
    """
    moved = Transferred()
    reset = True  # until the relay ends normally: a cancelled one (agent stopping) resets
    plain(sock)
    stream.attach_sink(sock, lambda: _start_drain(sock, stream))
    try:
        pending = stream.has_buffered or stream.eof
        if pending and not stream.deliver_buffered() and not stream.sink_failed:
            _start_drain(sock, stream)
        # What the tunnel holds back (the CONNECT, the 200) leaves with the first bytes read
        # here, or before this relay waits for them.
        reader = Reader(sock, before_wait=stream.io.queue_output)
        # A server app has yet to see the peer's first bytes, so a first recv would nearly
        # always fail: wait (level-triggered, so bytes already there are not missed). A client
        # app most often wrote while its connection waited to be accepted (it connects, then
        # writes at once): read first, and the CONNECT leaves with those bytes as one message,
        # which lets the server hold its 200 for the answer: one message less each way (at 4
        # concurrent connections, tunnel packets per connection 3.2 -> 2.1 and 1.9 -> 1.5).
        reader.more = not answers
        try:
            while data := await reader.recv():
                # Held back, then one more recv: an app that writes and closes at once (a
                # response, then close) has its FIN leave in the same packet as its data, as
                # it would without the mesh; otherwise the output leaves before the wait.
                await stream.send(data, push=not answers)
                if answers:
                    reader.more = True
                moved.up += len(data)
            await stream.send_eof()
            await stream.wait_down()
            reset = False
        except (OSError, trio.ClosedResourceError):
            stream.reset()
        except HboneError:
            pass
    finally:
        stream.detach_sink()
        moved.down = stream.delivered
        if reset and stream.reset_code is None:
            stream.reset()  # cancelled: the peer's app must see the cut too
        stream.close()
        if reset or stream.sink_failed or (stream.reset_code is not None and not stream.down_done):
            abort(sock)
        else:
            sock.close()
    return moved


def _start_drain(sock: socket.socket, stream: Stream) -> None:
    scope = stream.begin_drain()
    if scope is not None:
        stream.io.spawn(stream.id, _drain, sock, stream, scope)


async def _drain(sock: socket.socket, stream: Stream, scope: trio.CancelScope) -> None:
    """The peer's bytes into the app's socket, once it pushed back (see `relay_stream`)."""
    if scope.cancel_called:  # the relay ended (and closed the socket) before we started
        return
    outcome: DrainOutcome = "stopped"  # cancelled: the relay ended first
    with scope:
        try:
            while data := await stream.receive():
                await sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)
            outcome = "delivered"
        except (HboneError, trio.ClosedResourceError):
            pass  # the stream was reset: the relay sees it and aborts the socket
        except OSError:  # the app is gone
            outcome = "failed"
    stream.drained(outcome)


async def relay_tcp(a: socket.socket, b: socket.socket) -> Transferred:
    """TCP <-> TCP (passthrough and the plaintext inbound path)."""
    moved = Transferred()
    reset = False
    finished = False  # a cancelled relay (agent stopping) resets both sides
    plain(a)
    plain(b)

    async def pump(src: socket.socket, dst: socket.socket, forward: bool) -> None:
        nonlocal reset
        reader = Reader(src)
        try:
            while data := await reader.recv():
                await sendall(dst, data)
                if forward:
                    moved.up += len(data)
                else:
                    moved.down += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            reset = True
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, b, a, False)
            await pump(a, b, True)
        finished = True
    finally:
        for s in (a, b):
            if reset or not finished:
                abort(s)
            else:
                s.close()
    return moved
