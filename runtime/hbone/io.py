"""The I/O around HboneConnection: TLS on a real socket, one reader task, ordered writes.

Theory of operation
-------------------
`TlsSocket` runs TLS through memory BIOs over a non-blocking socket, with trio's
`wait_readable`/`wait_writable`, keeping TLS record work in C (trio's SSLStream does more of it
in Python, about twice the CPU per byte; see shared perf-notes). `HboneIO` owns one
connection: a single reader task feeds received bytes to the HTTP/2 state machine and
dispatches events to `Stream`s; every task that makes it produce frames encrypts them
*synchronously*, in order, and sends what the socket takes; a writer task sends the rest.
The reader never waits on the socket's send side (two peers whose readers both block on
writing would deadlock); senders of DATA wait only while the outbound buffer is above its
high-water mark.

Flow control gives backpressure end to end: received DATA is acknowledged only when the
consumer asks for the next chunk (i.e. after it wrote the previous one out), so a stream never
buffers more than its window (4 MiB); a sender waits for window updates.

Resource handling: `HboneIO.run()` runs until the peer closes or fails; on exit every stream
is woken with a reset so no relay waits forever. Error handling: TLS and HTTP/2 errors end
the connection (never a single stream); a stream reset ends only that stream.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, cast

import trio

from veil.core.hbone import (
    ConnectionTerminated,
    Data,
    ErrorCode,
    Event,
    HboneConnection,
    HboneProtocolError,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from veil.runtime import guard

DrainOutcome = Literal["delivered", "failed", "stopped"]

log = logging.getLogger("veil.hbone")
READ_SIZE = 256 * 1024
FIRST_READ_SIZE = 16 * 1024  # the read buffer until a tunnel is authenticated and busy
HIGH_WATER = 1024 * 1024  # outbound bytes queued before DATA senders wait
HOLD_LIMIT = 64 * 1024  # at most this much output waits to share a packet (send_data)
SMALL_FRAME = 4096  # DATA up to this size is copied into the pending frames (one TLS record)
HANDSHAKE_TIMEOUT = 10.0
# A connection whose data keeps coming yields to the others after this many reads (4 MiB),
# and after any read that carried more than FAIR_FRAMES frames: one busy or flooding tunnel
# never holds the node's loop for long, while bulk transfers (big DATA frames) read on.
FAIR_READS = 16
FAIR_FRAMES = 1024
# A tunnel whose peer went silent (node gone, agent frozen) ends instead of holding its
# streams until TCP gives up (~15 minutes): data unacknowledged this long aborts it, and an
# idle tunnel is probed (TCP keepalive) so a pooled one is found dead before it is reused.
TUNNEL_TIMEOUT = 20.0
# A CONNECT unanswered this long while nothing at all came from the peer (a PING asked for
# something each second: the node gone, a partition) is reset with that reason, and its
# tunnel takes no new stream, so the next connection dials (failing fast, or finding a path)
# instead of queueing behind a tunnel TCP gives up on only after TUNNEL_TIMEOUT. A peer that
# answers PINGs but holds the answer (our servers hold it for the app's first bytes) is
# alive: its streams wait as long as the app. Checked once a second per client tunnel, and
# only while it has such a stream (an idle pooled tunnel costs no timer).
ANSWER_TIMEOUT = 5.0
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 10, 5, 3


class HboneError(Exception):
    """A stream or connection failure; `status` is the CONNECT answer when there was one."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def tcp_liveness(sock: socket.socket) -> None:
    """TCP_NODELAY, keepalive probes and a user timeout on a tunnel's TCP connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(TUNNEL_TIMEOUT * 1000))


def peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "the peer"
    return f"{host}:{port}"


class TlsSocket:
    """TLS over a non-blocking socket through memory BIOs: few syscalls, record work in C.

    `SSLSocket` reads one TLS record (at most 16 KiB) per SSL_read with about two syscalls each,
    and writes one syscall per record. Here one `recv_into` of up to 256 KiB feeds the incoming
    BIO and `SSLObject.read` drains it; writes encrypt into the outgoing BIO and leave in one
    `send`. Unlike trio's SSLStream (a general-purpose wrapper, ~2x the CPU per byte) this does
    only what HBONE needs: ciphertext not yet accepted by the kernel waits in `_wbuf` and the
    owner sends it when the socket is writable (`flush_nowait` / `wait_writable`).
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            tcp_liveness(sock)
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        # Small until the peer is authenticated and sends in bulk: an idle or half-open
        # connection costs 16 KiB, not 256 (`_fill` grows it on the first full read after
        # the handshake).
        self._rbuf = bytearray(FIRST_READ_SIZE)
        self._handshaken = False
        self._wbuf = bytearray()
        self._eof = False
        self._streak = 0
        self._more = True  # the last read filled the buffer: the socket may hold more

    @property
    def read_buffer(self) -> int:
        """Bytes this connection holds for reading (16 KiB until it is busy, then 256)."""
        return len(self._rbuf)

    @property
    def pending(self) -> int:
        """Ciphertext bytes not yet accepted by the kernel."""
        return len(self._wbuf) + self._out.pending

    def _fill(self) -> bool:
        """Move what the socket has into the incoming BIO; False if nothing was ready."""
        try:
            n = self.sock.recv_into(self._rbuf)
        except BlockingIOError:
            self._more = False
            return False
        self._more = n == len(self._rbuf)
        if self._more and self._handshaken and n < READ_SIZE:
            self._in.write(memoryview(self._rbuf)[:n])
            self._rbuf = bytearray(READ_SIZE)  # a busy tunnel: read in large pieces from now on
            return True
        if n == 0:
            self._eof = True
            self._in.write_eof()
        else:
            self._in.write(memoryview(self._rbuf)[:n])
        return True

    def flush_nowait(self) -> bool:
        """Send pending ciphertext without waiting; True once everything left."""
        if self._out.pending:
            data = self._out.read()
            if self._wbuf:
                self._wbuf += data
            else:  # the common case: sent as read, only what the kernel refuses is kept
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return True
                self._wbuf += memoryview(data)[sent:]
                return False  # the kernel took only part: it is full
        while self._wbuf:
            try:
                sent = self.sock.send(self._wbuf)
            except BlockingIOError:
                return False
            del self._wbuf[:sent]
        return True

    async def flush(self) -> None:
        while not self.flush_nowait():
            await trio.lowlevel.wait_writable(self.sock)

    async def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """TimeoutError (an OSError that says with whom) when the peer does not finish it."""
        with trio.move_on_after(timeout) as waited:
            while True:
                try:
                    self.ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    with contextlib.suppress(OSError):
                        self.flush_nowait()  # send the alert: it tells the peer why
                    raise
                await self.flush()
                while not self._fill():
                    await trio.lowlevel.wait_readable(self.sock)
                if self._eof and not self._in.pending:
                    raise ssl.SSLEOFError("the peer closed during the TLS handshake") from None
            await self.flush()
        if waited.cancelled_caught:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"TLS handshake with {peer_of(self.sock)}: no answer within {timeout:g}s",
            )
        self._handshaken = True

    def _decrypt(self, n: int) -> memoryview:
        """Up to `n` plaintext bytes from what the incoming BIO holds, decrypted in place into
        one buffer sized by the ciphertext (never less than the plaintext it holds). SSL_read
        returns one record (16 KiB) per call: a bulk read of up to 256 KiB would otherwise be
        one object per record, joined by a further copy."""
        buf = memoryview(bytearray(min(n, self._in.pending + self.ssl.pending())))
        got = 0
        while got < len(buf):
            try:
                # with a buffer, read() returns the count (typeshed says bytes)
                k = cast(int, self.ssl.read(len(buf) - got, buf[got:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._eof = True
                break
            if not k:
                break
            got += k
            if not self._in.pending and not self.ssl.pending():
                break  # nothing left to decrypt: skip the read and its SSLWantReadError
        if self._out.pending:  # e.g. a KeyUpdate answer
            self.flush_nowait()
        return buf[:got]

    async def recv(self, n: int = READ_SIZE) -> bytes | memoryview:
        """Up to `n` decrypted bytes, at least one; b"" once the peer closed."""
        self._streak += 1
        if self._streak >= FAIR_READS:  # fairness: yield now and then even when data keeps coming
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            data = self._decrypt(n)
            if data:
                return data
            if self._eof:
                return b""
            # After a short read the socket is most likely empty: wait instead of trying a
            # recv that fails (epoll is level-triggered, so nothing that arrived is missed).
            if not self._more or not self._fill():
                self._streak = 0
                await trio.lowlevel.wait_readable(self.sock)
                self._fill()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt into the outgoing buffer (never blocks); `flush_nowait` sends it."""
        self.ssl.write(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Stream:
    """One CONNECT stream: a byte pipe with half-close and reset, like a TCP connection."""

    def __init__(self, io: HboneIO, stream_id: int) -> None:
        self.io, self.id = io, stream_id
        self._chunks: deque[tuple[memoryview, int]] = deque()
        self._unacked = 0
        self._wake: trio.Event | None = None  # made when a task waits: most never do
        self.eof = False  # the peer sent END_STREAM
        self.reset_code: int | None = None
        self.status: int | None = None  # client: the CONNECT answer
        self.error: str | None = None  # why we reset it ourselves, when we did
        self.sent_eof = False
        # The app's socket, when a relay runs: the reader writes DATA straight into it and
        # shuts it down at END_STREAM. Only if the socket pushes back does the relay start a
        # task to drain (`draining`, via `on_backlog`); from then on all data goes through it,
        # so bytes are never reordered.
        self.sink: socket.socket | None = None
        self.sink_failed = False
        self.draining = False
        self.drain_scope: trio.CancelScope | None = None
        self.on_backlog: Callable[[], None] | None = None
        self.down_done = False  # END_STREAM delivered to the sink as a FIN
        self.delivered = 0  # bytes handed to the consumer

    # -- what a relay uses (agent/proxy/copy.py): it owns the sink while it runs ------------

    @property
    def has_buffered(self) -> bool:
        """Payload arrived that no consumer took yet (early data before the answer)."""
        return bool(self._chunks)

    def attach_sink(self, sock: socket.socket, on_backlog: Callable[[], None]) -> None:
        """From now on the reader writes received payload straight into `sock`; when it
        pushes back, `on_backlog` is called (once) to start a drain task."""
        self.sink, self.on_backlog = sock, on_backlog

    def detach_sink(self) -> None:
        """The relay is done with the socket: stop any drain and write nothing more to it."""
        if self.drain_scope is not None:
            self.drain_scope.cancel()  # the drain leaves the socket before it is closed
        self.sink = None
        self.on_backlog = None

    def begin_drain(self) -> trio.CancelScope | None:
        """Switch to draining through a task (under the returned scope, which `detach_sink`
        cancels); None if a drain already runs: all data then goes through it, in order."""
        if self.draining:
            return None
        self.draining = True
        self.drain_scope = trio.CancelScope()
        return self.drain_scope

    def drained(self, outcome: DrainOutcome) -> None:
        """The drain task ended: "delivered" (everything and the FIN reached the socket),
        "failed" (the app's socket is gone: the stream is reset) or "stopped" (the stream was
        reset, or the relay ended first). Wakes whoever waits on the stream."""
        if outcome == "delivered":
            self.down_done = True
        elif outcome == "failed":
            self.sink_failed = True
            self.reset()
            if self.sink is not None:
                trio.lowlevel.notify_closing(self.sink)  # wake the relay if it waits to read
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def _changed(self) -> None:
        """Until the next `_notify()`."""
        if self._wake is None:
            self._wake = trio.Event()
        await self._wake.wait()

    async def wait_down(self) -> None:
        """Until the peer's side is delivered (FIN passed on), or the stream or sink failed."""
        while not self.down_done and self.reset_code is None and not self.sink_failed:
            await self._changed()

    def deliver_buffered(self) -> bool:
        """Write what arrived before the sink was set straight into it (and the FIN, if it
        came); False if the sink pushed back or failed, leaving the rest to a drain task."""
        assert self.sink is not None
        sent_total = 0
        done = True
        while self._chunks:
            data, flow = self._chunks[0]
            fin_follows = self.eof and len(self._chunks) == 1 and self.reset_code is None
            try:
                sent = self.sink.send(data, socket.MSG_MORE if fin_follows else 0)
            except BlockingIOError:
                sent = 0
            except OSError:  # the app is gone
                self.sink_failed = True
                self.reset()
                return False
            sent_total += sent
            if sent < len(data):
                self._chunks[0] = (data[sent:], flow - sent)
                done = False
                break
            self._chunks.popleft()
        if sent_total:
            self.delivered += sent_total
            self.io.conn.acknowledge(self.id, sent_total)  # sent with the relay's next output
        if done and self.eof and self.reset_code is None:
            self._sink_eof()
        return done

    def _sink_eof(self) -> None:
        assert self.sink is not None
        try:
            self.sink.shutdown(socket.SHUT_WR)
        except OSError:
            self.sink_failed = True
        self.down_done = True

    def _sink_abort(self) -> None:
        """Wake the tasks blocked on the app's socket (relay, drain): the stream is gone."""
        if self.sink is not None:
            trio.lowlevel.notify_closing(self.sink)

    async def response(self) -> int:
        while self.status is None and self.reset_code is None:
            await self._changed()
        if self.status is None:
            raise HboneError(
                self.error or f"stream reset before an answer (code {self.reset_code})"
            )
        return self.status

    async def receive(self) -> memoryview | bytes:
        """The next chunk; b"" at end of stream; HboneError if the stream was reset."""
        if self._unacked:
            self.io.conn.acknowledge(self.id, self._unacked)
            self._unacked = 0
            self.io.queue_output()
            await self.io.flush()
        while not self._chunks and not self.eof and self.reset_code is None:
            await self._changed()
        if self._chunks:
            data, flow = self._chunks.popleft()
            self._unacked = flow
            self.delivered += len(data)
            return data
        if self.reset_code is not None:
            raise HboneError(f"stream reset by peer (code {self.reset_code})")
        return b""

    async def send(self, data: bytes | memoryview, push: bool = True) -> None:
        await self.io.send_data(self, data, push)

    async def send_eof(self) -> None:
        if not self.sent_eof and self.reset_code is None:
            self.sent_eof = True
            self.io.conn.end_stream(self.id)
            self.io.queue_output()
            await self.io.flush()

    def reset(self, code: ErrorCode = ErrorCode.CANCEL) -> None:
        if self.reset_code is None:
            self.reset_code = int(code)
            self.io.conn.reset(self.id, code)
            self.io.queue_output()

    def close(self) -> None:
        """Forget the stream (after both directions finished or a reset)."""
        if self.io.streams.pop(self.id, None) is None:
            return
        unconsumed = self._unacked + sum(flow for _, flow in self._chunks)
        self._chunks.clear()
        self._unacked = 0
        self.io.conn.forget(self.id, unconsumed)
        self.io.queue_output()
        self.io.last_active = time.monotonic()
        if self.io.going_away and not self.io.streams:
            self.io.shutdown()


OnRequest = Callable[[RequestReceived, "HboneIO"], None]


class HboneIO:
    def __init__(
        self, tls: TlsSocket, conn: HboneConnection, peer: str, on_request: OnRequest | None = None
    ) -> None:
        self.tls, self.conn, self.peer = tls, conn, peer
        self.on_request = on_request
        self.streams: dict[int, Stream] = {}
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._drained_waiters = 0
        self._window = trio.Event()
        self.closed = False
        self.going_away = False  # GOAWAY sent or received: no new streams, close when idle
        self.expires = math.inf  # Unix time the tunnel's certificates run out (tunnel_expiry)
        self.last_active = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self.answer_timeout = ANSWER_TIMEOUT
        # client: (deadline, stream, reads when opened) of streams without an answer yet
        self._unanswered: deque[tuple[float, Stream, int]] = deque()
        self._watch_wake: trio.Event | None = None  # set while the watcher waits for work
        self.reads = 0  # successful reads from the peer: it was alive when this moved
        self.violation: ErrorCode | None = None  # how the peer broke HTTP/2, if it did

    # -- output ----------------------------------------------------------------------------

    def queue_output(self) -> None:
        """Encrypt the frames pending in the connection and send what the socket takes now.

        Frames are encrypted in the order they were produced (HPACK depends on it) and nothing
        waits here: ciphertext the socket does not take now is sent by the writer task once it
        is writable, so most frames leave without a task switch. DATA held back by
        `send_data(push=False)` leaves here too.
        """
        data = self.conn.data_to_send()
        if data:
            self.tls.write(data)
        if self.tls.pending:
            self._push()

    def _push(self) -> None:
        if self.closed:
            return
        try:
            done = self.tls.flush_nowait()
        except (OSError, ssl.SSLError) as e:
            self._fail(f"send failed: {e}")
            return
        if not done:
            self._out_ready.set()
            return
        self.conn.output_drained()
        if self._drained_waiters:
            self._drained.set()
            self._drained = trio.Event()

    async def flush(self) -> None:
        """Backpressure for senders: wait while too much output is pending."""
        while self.tls.pending > HIGH_WATER and not self.closed:
            self._drained_waiters += 1
            try:
                await self._drained.wait()
            finally:
                self._drained_waiters -= 1

    async def _write_loop(self) -> None:
        """Sends what `_push()` could not: waits for the socket, never holds up others."""
        while not self.closed:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            while self.tls.pending and not self.closed:
                try:
                    await trio.lowlevel.wait_writable(self.tls.sock)
                except (OSError, trio.ClosedResourceError):
                    self._fail("socket closed while writing")
                    return
                self._push()
            self._drained.set()
            self._drained = trio.Event()

    async def send_data(self, stream: Stream, data: bytes | memoryview, push: bool = True) -> None:
        """Frame and encrypt `data`; with `push=False` a small write stays queued until the
        next `queue_output()` or write, so what follows at once (often the FIN) shares its
        packet."""
        view = memoryview(data)
        while view:
            if stream.reset_code is not None or self.closed:
                raise HboneError("stream closed while sending")
            window = self.conn.send_window(stream.id)
            if window < 0:
                raise HboneError("stream closed while sending")
            if window == 0:
                self.queue_output()  # the peer grants more only for what it received
                await self._window.wait()
                continue
            n = min(len(view), window, self.conn.max_frame)
            if n <= SMALL_FRAME:
                # Queued with the frames before and after it (the CONNECT, a held 200, the
                # END_STREAM): they leave as one TLS record instead of one each.
                self.conn.data_frame(stream.id, view[:n])
                view = view[n:]
                if push or view or self.conn.pending_output + self.tls.pending >= HOLD_LIMIT:
                    self.queue_output()
            else:
                header = self.conn.data_header(stream.id, n)
                pending = self.conn.data_to_send()
                if pending:
                    self.tls.write(pending)
                self.tls.write(header)
                self.tls.write(view[:n])  # a big payload is encrypted from the read buffer
                view = view[n:]
                if push or view or self.tls.pending >= HOLD_LIMIT:
                    self._push()
            await self.flush()

    # -- client ----------------------------------------------------------------------------

    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], wait_response: bool = True
    ) -> Stream:
        """Open a CONNECT stream. With `wait_response`, return once the peer answered 2xx
        (HboneError otherwise); without, return at once: the caller may send data early
        (RFC 9113 section 8.5: after its HEADERS, a client's DATA is tunnel payload), and a
        refusal arrives as a reset with `status` set. The caller then owns sending the
        HEADERS: they leave with the first DATA, or at its next `queue_output()`."""
        if self.closed:
            raise HboneError(f"connection to {self.peer} is closed")
        sid = self.conn.connect(authority, headers)
        stream = self.streams[sid] = Stream(self, sid)
        self.last_active = now = time.monotonic()
        self._unanswered.append((now + self.answer_timeout, stream, self.reads))
        if self._watch_wake is not None:  # an idle tunnel's watcher sleeps without a timer
            self._watch_wake.set()
            self._watch_wake = None
        if not wait_response:
            return stream  # the HEADERS leave with the stream's first DATA or output flush
        self.queue_output()
        await self.flush()
        status = await stream.response()
        if not 200 <= status < 300:
            stream.close()
            raise HboneError(f"{self.peer} answered {status} to CONNECT {authority}", status)
        return stream

    # -- the reader ------------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if not self.closed:
            log.debug("hbone connection %s closed: %s", self.peer, why)
        self.closed = True
        for s in list(self.streams.values()):
            if s.reset_code is None and not (s.eof and s.sent_eof):
                s.reset_code = int(ErrorCode.CONNECT_ERROR)
                s._sink_abort()
            s._notify()
        self._window.set()
        self._out_ready.set()
        self._drained.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and dispatch until the connection ends; request handlers run in our nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.queue_output()  # the connection preface and our settings
                nursery.start_soon(self._write_loop)
                if self.conn.client:
                    nursery.start_soon(self._watch_answers)
                task_status.started()
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._fail("reader finished")
            self.tls.close()

    async def _read_loop(self) -> None:
        frames = 0
        while True:
            try:
                data = await self.tls.recv(READ_SIZE)
            except (OSError, ssl.SSLError) as e:
                self._fail(f"receive failed: {e}")
                return
            if not data:
                self._fail("peer closed")
                return
            self.reads += 1
            try:
                events = self.conn.receive_data(data)
            except HboneProtocolError as e:
                log.info("HTTP/2 protocol error from %s: %s", self.peer, e)
                self.violation = e.code
                self.queue_output()  # the GOAWAY
                with trio.move_on_after(1):
                    await self.tls.flush()
                self._fail(str(e))
                return
            window_changed = self._dispatch(events)
            if window_changed:
                self._window.set()
                self._window = trio.Event()
            self.queue_output()
            if self.closed:
                return
            if self.conn.frames_received - frames > FAIR_FRAMES:
                # Many small frames (a flood, or a chatty peer): each costs us far more than
                # its bytes, so let the other tunnels run before the next read.
                frames = self.conn.frames_received
                await trio.lowlevel.checkpoint()

    def _dispatch(self, events: list[Event]) -> bool:
        window_changed = False
        last = len(events) - 1
        for i, ev in enumerate(events):
            if isinstance(ev, Data):
                nxt = events[i + 1] if i < last else None
                self._deliver(ev, isinstance(nxt, StreamEnded) and nxt.stream_id == ev.stream_id)
            elif isinstance(ev, WindowOpened):
                window_changed = True
            elif isinstance(ev, StreamEnded):
                if (s := self.streams.get(ev.stream_id)) is not None:
                    s.eof = True
                    if s.sink is not None and not s.draining and s.reset_code is None:
                        s._sink_eof()  # a refusal's END_STREAM is no FIN: the app gets a reset
                    s._notify()
            elif isinstance(ev, StreamReset):
                if (s := self.streams.get(ev.stream_id)) is not None:
                    s.reset_code = ev.error_code
                    s._sink_abort()
                    s._notify()
                window_changed = True
            elif isinstance(ev, ResponseReceived):
                if (s := self.streams.get(ev.stream_id)) is not None:
                    s.status = ev.status
                    if not 200 <= ev.status < 300 and s.reset_code is None:
                        s.reset_code = int(ErrorCode.CONNECT_ERROR)  # refused: nothing flows
                        s._sink_abort()
                    s._notify()
            elif isinstance(ev, RequestReceived):
                if time.time() >= self.expires:
                    # Authenticated by a certificate that has expired since: not processed,
                    # so a client may retry it on a new connection (RFC 9113 section 8.7).
                    log.info("hbone connection %s: certificates expired, no new stream", self.peer)
                    self.conn.reset(ev.stream_id, ErrorCode.REFUSED_STREAM)
                    self.retire()
                    continue
                self.streams[ev.stream_id] = Stream(self, ev.stream_id)
                self.last_active = time.monotonic()
                if self.on_request is not None:
                    try:
                        self.on_request(ev, self)
                    except Exception:  # a bug on one stream ends that stream, not the tunnel
                        guard.caught("hbone_request")
                        self.abort_stream(ev.stream_id)
            elif isinstance(ev, ConnectionTerminated):
                self._peer_goes_away(ev)
        return window_changed

    def _peer_goes_away(self, ev: ConnectionTerminated) -> None:
        """GOAWAY (RFC 9113 section 6.8): the peer takes no new stream. Ours above its last
        stream id were never processed and end as refused; the others run to their end, and
        the connection closes when none is left (a peer with an error closes it sooner)."""
        log.debug(
            "hbone connection %s: GOAWAY (error code %d, last stream %d)",
            self.peer,
            ev.error_code,
            ev.last_stream_id,
        )
        self.going_away = True
        for s in list(self.streams.values()):
            if s.id > ev.last_stream_id and (s.id % 2 == 1) == self.conn.client:
                s.reset(ErrorCode.REFUSED_STREAM)
                s._sink_abort()
                s._notify()
        if not self.streams:
            self.shutdown()

    def notice_shutdown(self) -> None:
        """A server about to hand over: ask the client to open its next streams elsewhere
        while still taking those already on their way (`retire()` follows)."""
        if not self.closed:
            self.conn.notice_shutdown()
            self.queue_output()

    async def _watch_answers(self) -> None:
        """Reset the streams whose CONNECT got no answer in time (see ANSWER_TIMEOUT)."""
        queue = self._unanswered
        while not self.closed:
            if not queue:
                self._watch_wake = wake = trio.Event()
                await wake.wait()
            await trio.sleep(1.0)
            now = time.monotonic()
            late = False
            while queue:
                deadline, s, reads = queue[0]
                if s.status is None and s.reset_code is None and reads == self.reads:
                    if deadline > now:
                        break
                    late = True
                    s.error = (
                        f"no answer to CONNECT from {self.peer} within {self.answer_timeout:g}s"
                    )
                    s.reset()
                    s._sink_abort()
                    s._notify()
                queue.popleft()  # answered, reset, or the peer spoke since: it is alive
            if queue and not late:
                self.conn.ping()  # its ACK (or anything else) proves the peer is there
                self.queue_output()
            if late:
                self._window.set()  # a sender waiting for window sees its reset
                self._window = trio.Event()
                log.warning(
                    "hbone connection %s: a CONNECT got no answer within %gs; "
                    "no new stream goes over it",
                    self.peer,
                    self.answer_timeout,
                )
                self.retire()

    def retire(self) -> None:
        """Take no new stream (GOAWAY); close once the open ones have ended."""
        if self.closed:
            return
        self.conn.close()
        self.queue_output()
        self.going_away = True
        if not self.streams:
            self.shutdown()

    def shutdown(self) -> None:
        """Close the connection: GOAWAY, then a TCP shutdown that also ends our reader (its
        socket reads EOF), which resets whatever stream is still open."""
        if self.closed:
            return
        self.conn.close()
        self.queue_output()
        with contextlib.suppress(OSError):
            self.tls.sock.shutdown(socket.SHUT_RDWR)

    def _deliver(self, ev: Data, fin_follows: bool = False) -> None:
        """Hand received payload on: straight into the app's socket when it takes it all.

        When END_STREAM follows at once, the data is sent with MSG_MORE: the FIN then rides
        in the same segment, and the app sees data and end together, as from a server that
        writes and closes (otherwise it may close first and hold the TIME_WAIT).
        """
        s = self.streams.get(ev.stream_id)
        n = len(ev.data)
        if s is None:  # a stream we already finished: keep the connection window open
            self.conn.acknowledge(ev.stream_id, n)
            return
        view = ev.data
        if s.sink is not None and not s.draining and s.reset_code is None:
            try:
                sent = s.sink.send(view, socket.MSG_MORE if fin_follows else 0)
            except BlockingIOError:
                sent = 0
            except OSError:  # the app is gone: reset the stream, keep the window
                s.sink_failed = True
                self.conn.acknowledge(ev.stream_id, n)
                s.reset()
                s._notify()
                return
            s.delivered += sent
            if sent:
                self.conn.acknowledge(ev.stream_id, sent)
            if sent == n:
                return
            view = view[sent:]
        s._chunks.append((view, len(view)))  # a view: each decrypted read is a fresh object
        s._notify()
        if s.on_backlog is not None:
            s.on_backlog()

    def spawn(self, stream_id: int, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a handler of stream `stream_id` in this connection's nursery (server side),
        behind the barrier: an exception it leaves unhandled resets that stream only."""
        assert self._nursery is not None
        self._nursery.start_soon(
            lambda: guard.guarded(
                "hbone_stream", fn, *args, cleanup=lambda: self.abort_stream(stream_id)
            )
        )

    def abort_stream(self, stream_id: int, code: ErrorCode = ErrorCode.INTERNAL_ERROR) -> None:
        """Reset and forget a stream whose handler failed; its app socket is woken."""
        s = self.streams.get(stream_id)
        if s is None:
            return
        s.reset(code)
        s._sink_abort()
        s._notify()
        s.close()
