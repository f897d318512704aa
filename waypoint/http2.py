"""HTTP/2 (prior knowledge) from clients at the waypoint, on top of the h2 state machine.

Each HTTP/2 request stream is presented to the waypoint's request logic as an `H2Exchange`
that speaks h11's event types (`Request`, `Data`, `EndOfMessage`, `Response`), so routing,
policy, resilience and telemetry are one code path for both protocols; backends are reached
with HTTP/1.1 over HBONE. One reader task feeds h2, one writer task sends what h2 produced, in
order (HPACK depends on it); request bodies are bounded by HTTP/2 flow control (the window is
re-opened only as the waypoint consumes data).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import trio

from veil.runtime import guard
from veil.runtime.hbone.io import HboneError, Stream
from veil.waypoint.http1 import HOP_BY_HOP

log = logging.getLogger("veil.waypoint")
WINDOW = 1024 * 1024
OUTPUT_LIMIT = 1024 * 1024  # answers queued for a client before we stop reading its requests


class H2Exchange:
    """One request stream, with the h11-like surface the waypoint's request logic uses."""

    def __init__(self, conn: H2Server, stream_id: int) -> None:
        self.conn, self.stream_id = conn, stream_id
        # Unbounded here; bounded by flow control: the window reopens only as data is consumed.
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self.our_state: Any = h11.SEND_RESPONSE
        self.their_state: Any = h11.SEND_BODY
        self.request: h11.Request | None = None
        self.gone = False  # reset by the client: nothing more is delivered

    async def next_event(self) -> Any:
        if self.their_state is h11.DONE:
            return h11.PAUSED
        try:
            ev = await self._recv.receive()
        except trio.EndOfChannel:
            ev = h11.ConnectionClosed()
        if isinstance(ev, h11.Data):
            self.conn.consumed(self.stream_id, len(ev.data))
        if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
            self.their_state = h11.DONE
        return ev

    async def send(self, event: Any) -> None:
        """Send an h11-style event on this HTTP/2 stream; HboneError if the stream is gone
        (reset by the client, or the connection closed), as for an HBONE stream."""
        try:
            await self._send_event(event)
        except h2.exceptions.ProtocolError as e:
            raise HboneError(f"HTTP/2 stream {self.stream_id} closed: {e!r}") from None

    async def _send_event(self, event: Any) -> None:
        if isinstance(event, h11.Response | h11.InformationalResponse):
            if isinstance(event, h11.InformationalResponse):
                return  # 1xx are not passed on
            headers = [(":status", str(event.status_code))] + [
                (n.decode("latin-1").lower(), v.decode("latin-1"))
                for n, v in event.headers
                if n.decode("latin-1").lower() not in HOP_BY_HOP
            ]
            self.conn.h2.send_headers(self.stream_id, headers)
            self.our_state = h11.SEND_BODY
            self.conn.wake()
        elif isinstance(event, h11.Data):
            await self.conn.send_data(self.stream_id, bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            self.conn.h2.end_stream(self.stream_id)
            self.our_state = h11.DONE
            self.conn.wake()


Handler = Callable[[H2Exchange], Awaitable[None]]


class H2Server:
    """The server side of one HTTP/2 connection carried in an HBONE stream."""

    def __init__(self, stream: Stream, handler: Handler) -> None:
        self.stream, self.handler = stream, handler
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        )
        self.exchanges: dict[int, H2Exchange] = {}
        self._dirty = trio.Event()
        self._out = bytearray()  # produced, not yet handed to the HBONE stream
        self._drained = trio.Event()
        self._window = trio.Event()
        self.closed = False

    @property
    def pending_output(self) -> int:
        """Bytes produced for the client and not yet handed to its HBONE stream."""
        return len(self._out)

    def wake(self) -> None:
        """Take what h2 produced into our output buffer (in order) and let the writer run."""
        out = self.h2.data_to_send()
        if out:
            self._out += out
        self._dirty.set()

    def consumed(self, stream_id: int, n: int) -> None:
        """Re-open the peer's window as the waypoint consumes request data."""
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, KeyError):
            return
        self.wake()

    async def send_data(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise HboneError("HTTP/2 connection closed")
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                self._window = trio.Event()
                await self._window.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream_id, bytes(chunk))
            self.wake()

    async def run(self, first: bytes) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            try:
                data: bytes | memoryview = first
                while data:
                    self._dispatch(self.h2.receive_data(bytes(data)), nursery)
                    self.wake()
                    # A client that sends (PINGs, SETTINGS, requests) but never reads our
                    # answers would grow them without bound: read on only once they left.
                    while len(self._out) > OUTPUT_LIMIT and not self.closed:
                        await self._drained.wait()
                    data = await self.stream.receive()
            except (h2.exceptions.ProtocolError, HboneError) as e:
                log.info("HTTP/2 client connection ended: %s", e)
                if isinstance(e, h2.exceptions.ProtocolError):
                    await self._flush_goaway()
            self.closed = True
            self._window.set()
            for ex in self.exchanges.values():
                ex.gone = True
                ex._send.close()
            await self._wait_handlers()
            nursery.cancel_scope.cancel()
        await self.stream.send_eof()

    async def _flush_goaway(self) -> None:
        """h2 answered a connection error with a GOAWAY naming it (RFC 9113 5.4.1): send it
        before the stream ends, so the client learns why (bounded: a second at most)."""
        self.wake()
        with trio.move_on_after(1):
            while self._out:
                await self._drained.wait()

    async def _wait_handlers(self) -> None:
        while self.exchanges:
            await trio.sleep(0.01)

    def _dispatch(self, events: list[Any], nursery: trio.Nursery) -> None:
        for ev in events:
            sid: int = getattr(ev, "stream_id", 0) or 0
            found = self.exchanges.get(sid)
            if isinstance(ev, h2.events.RequestReceived):
                new = self.exchanges[sid] = H2Exchange(self, sid)
                new.request = _request(ev.headers or [], ev.stream_ended is None)
                nursery.start_soon(self._handle, new)
            elif isinstance(ev, h2.events.DataReceived):
                if found is not None and ev.data and not found.gone:
                    found._send.send_nowait(h11.Data(data=ev.data))
                elif ev.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                if found is not None and not found.gone:
                    found._send.send_nowait(h11.EndOfMessage())
            elif isinstance(ev, h2.events.StreamReset):
                if found is not None:
                    found.gone = True
                    found._send.close()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._window.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True

    async def _handle(self, ex: H2Exchange) -> None:
        try:
            await self.handler(ex)
        except Exception:  # one request's failure resets its stream, not the connection
            guard.caught("waypoint_http2_request")
        finally:
            if ex.our_state is not h11.DONE:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.reset_stream(ex.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.exchanges.pop(ex.stream_id, None)
            self.wake()

    async def _write_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            while self._out:
                data = bytes(self._out)
                self._out.clear()
                try:
                    await self.stream.send(data)
                except HboneError:
                    self.closed = True
                    self._window.set()
                    self._drained.set()
                    return
            self._drained.set()
            self._drained = trio.Event()


def _request(headers: list[tuple[Any, Any]], has_body: bool) -> h11.Request | None:
    """The HTTP/2 request head as an h11 Request (Host from :authority; a body of unknown
    length is marked chunked, so it is streamed rather than buffered)."""
    pseudo: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for n, v in headers:
        name = n.decode("latin-1") if isinstance(n, bytes) else n
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        if name.startswith(":"):
            pseudo[name] = value
        elif name not in ("host", "te"):
            out.append((name, value))
    authority = pseudo.get(":authority", "")
    if has_body and not any(n == "content-length" for n, _ in out):
        out.append(("transfer-encoding", "chunked"))
    try:
        return h11.Request(
            method=pseudo.get(":method", "GET"),
            target=pseudo.get(":path", "/"),
            headers=[("host", authority), *out],
            http_version="2.0",  # never an HTTP/1.1 upgrade (RFC 9113 8.2.2)
        )
    except h11.LocalProtocolError:
        return None
