"""HTTP/2 (prior knowledge) at the waypoint, on top of the h2 state machine: from clients
(`H2Server`) and to backends (`H2Client`).

Each HTTP/2 request stream is presented to the waypoint's request logic as an `H2Exchange`
that speaks h11's event types (`Request`, `Data`, `EndOfMessage`, `Response`; trailers ride
on `EndOfMessage.headers`), so routing, policy, resilience and telemetry are one code path
for both protocols. One reader task feeds h2, one writer task sends what h2 produced, in
order (HPACK depends on it); request bodies are bounded by HTTP/2 flow control (the window is
re-opened only as the waypoint consumes data). A backend that speaks HTTP/2 (gRPC, h2c) is
an `H2Client` with the same surface, driven by the forwarder's reads: no task of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
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


class H2Messages:
    """What speaks h11's events over HTTP/2 (`next_event`, `send`): a client's request stream
    or a backend connection; `waypoint.messages` drives both like an h11 connection."""

    our_state: Any
    their_state: Any

    async def next_event(self) -> Any:
        raise NotImplementedError

    async def send(self, event: Any) -> None:
        raise NotImplementedError


def _trailers(headers: Any) -> list[tuple[str, str]]:
    """Trailer fields as HTTP/2 may carry them: no pseudo-headers, no hop-by-hop fields."""
    out = []
    for n, v in headers or ():
        name = (n.decode("latin-1") if isinstance(n, bytes) else n).lower()
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        if not name.startswith(":") and name not in HOP_BY_HOP and name != "content-length":
            out.append((name, value))
    return out


class H2Exchange(H2Messages):
    """One request stream, with the h11-like surface the waypoint's request logic uses."""

    def __init__(self, conn: H2Server, stream_id: int) -> None:
        self.conn, self.stream_id = conn, stream_id
        # Unbounded here; bounded by flow control: the window reopens only as data is consumed.
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self.our_state: Any = h11.SEND_RESPONSE
        self.their_state: Any = h11.SEND_BODY
        self.request: h11.Request | None = None
        self.gone = False  # reset by the client: nothing more is delivered
        self.trailers: list[tuple[str, str]] = []  # the request's, once received
        self._held: list[tuple[str, str]] | None = None  # a gRPC response head not yet sent

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
            self.our_state = h11.SEND_BODY
            if any(n == "content-type" and v.startswith("application/grpc") for n, v in headers):
                self._held = headers  # until we know whether a message follows (see below)
                return
            self.conn.h2.send_headers(self.stream_id, headers)
            self.conn.wake()
        elif isinstance(event, h11.Data):
            self._release_head()
            await self.conn.send_data(self.stream_id, bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            trailers = _trailers(event.headers)  # gRPC's status rides here
            if self._held is not None:
                # a gRPC answer without a message is "Trailers-Only": one HEADERS frame that
                # ends the stream; gRPC clients read no status from a later, separate one
                self.conn.h2.send_headers(self.stream_id, self._held + trailers, end_stream=True)
                self._held = None
            elif trailers:
                self.conn.h2.send_headers(self.stream_id, trailers, end_stream=True)
            else:
                self.conn.h2.end_stream(self.stream_id)
            self.our_state = h11.DONE
            self.conn.wake()

    def _release_head(self) -> None:
        if self._held is not None:
            self.conn.h2.send_headers(self.stream_id, self._held)
            self._held = None
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
            elif isinstance(ev, h2.events.TrailersReceived):
                if found is not None:
                    found.trailers = _trailers(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                if found is not None and not found.gone:
                    found._send.send_nowait(h11.EndOfMessage(headers=found.trailers))
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


HTTP2_HOP_BY_HOP = HOP_BY_HOP | {"host", "transfer-encoding"}


class H2Client(H2Messages):
    """The client side of one HTTP/2 connection (prior knowledge) to a backend pod, over an
    HBONE stream: one request at a time (kept for the next when both sides finished), with
    h11's surface. Nothing runs in the background: bytes are read when the forwarder waits
    for the response, or for send window while it sends a body; response data is
    acknowledged as the forwarder consumes it, so the backend is bounded by our window.
    The request body and the response may move at once (a gRPC stream), from two tasks: one
    reads the stream at a time, and what h2 produced leaves in order."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        )
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        self.h2.increment_flow_control_window(WINDOW)
        self.stream_id = 0
        self.events: deque[Any] = deque()
        self.our_state: Any = h11.IDLE
        self.their_state: Any = h11.IDLE
        self.terminated = False  # GOAWAY, end of stream or a connection error
        self._trailers: list[tuple[str, str]] = []
        self.trailing_data = (b"", False)  # h11's attribute: nothing is read past a message
        self._reading = trio.Lock()
        self._writing = trio.Lock()

    def reusable(self) -> bool:
        return self.our_state is h11.DONE and self.their_state is h11.DONE and not self.terminated

    def start_next_cycle(self) -> None:
        self.stream_id = 0
        self.events.clear()
        self.our_state = self.their_state = h11.IDLE

    async def send(self, event: Any) -> None:
        try:
            await self._send_event(event)
        except h2.exceptions.ProtocolError as e:
            self.terminated = True
            raise HboneError(f"backend HTTP/2 stream: {e!r}") from None

    async def _send_event(self, event: Any) -> None:
        if isinstance(event, h11.Request):
            self.stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(self.stream_id, _request_head(event))
            self.our_state, self.their_state = h11.SEND_BODY, h11.SEND_RESPONSE
            self._trailers = []
            if self.events:  # nothing from an earlier cycle belongs to this one
                self.events.clear()
        elif isinstance(event, h11.Data):
            view = memoryview(bytes(event.data))
            while view:
                window = min(
                    self.h2.local_flow_control_window(self.stream_id),
                    self.h2.max_outbound_frame_size,
                )
                if window <= 0:
                    await self._flush()
                    async with self._reading:  # the other task may have read the update
                        if self._window() <= 0 and self.their_state is not h11.DONE:
                            await self._receive()  # until a WINDOW_UPDATE comes
                    if self.their_state is h11.DONE and self._window() <= 0:
                        raise HboneError("the backend ended the stream during the request")
                    continue
                chunk, view = view[:window], view[window:]
                self.h2.send_data(self.stream_id, bytes(chunk))
        elif isinstance(event, h11.EndOfMessage):
            if trailers := _trailers(event.headers):
                self.h2.send_headers(self.stream_id, trailers, end_stream=True)
            else:
                self.h2.end_stream(self.stream_id)
            self.our_state = h11.DONE
        await self._flush()

    def _window(self) -> int:
        try:
            return int(self.h2.local_flow_control_window(self.stream_id))
        except h2.exceptions.ProtocolError:  # the stream is closed: nothing more to send
            return 0

    async def next_event(self) -> Any:
        while not self.events:
            if self.their_state is h11.DONE:  # (after a GOAWAY, a stream it spared goes on)
                return h11.ConnectionClosed()
            async with self._reading:
                if not self.events:  # else the other task read them for us
                    await self._receive()
        ev = self.events.popleft()
        if isinstance(ev, h11.Data):  # consumed: the backend may send that much more
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.acknowledge_received_data(len(ev.data), self.stream_id)
            await self._flush()
        return ev

    async def _flush(self) -> None:
        async with self._writing:  # in order: HPACK state and frames depend on it
            if out := self.h2.data_to_send():
                await self.stream.send(out)

    async def _receive(self) -> None:
        data = await self.stream.receive()
        if not data:
            self._end("the backend closed the connection")
            return
        try:
            events = self.h2.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as e:
            self.terminated = True
            await self._flush()  # h2's GOAWAY naming the error
            raise HboneError(f"backend HTTP/2: {e!r}") from None
        try:
            for ev in events:
                self._dispatch(ev)
        except (ValueError, h11.LocalProtocolError) as e:  # a head h11 cannot carry
            self.terminated = True
            raise HboneError(f"backend HTTP/2 response: {e}") from None
        await self._flush()

    def _end(self, why: str) -> None:
        self.terminated = True
        if self.their_state is not h11.DONE:
            log.debug("backend HTTP/2 stream %d: %s", self.stream_id, why)
            self.events.append(h11.ConnectionClosed())
            self.their_state = h11.DONE

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, h2.events.ConnectionTerminated):
            if ev.last_stream_id is None or ev.last_stream_id < self.stream_id:
                self._end(f"GOAWAY {ev.error_code!r}")
            self.terminated = True  # no new requests on it either way
            return
        if getattr(ev, "stream_id", None) != self.stream_id or self.their_state is h11.DONE:
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            return
        if isinstance(ev, h2.events.InformationalResponseReceived):
            self.events.append(_response(ev.headers or [], h11.InformationalResponse))
        elif isinstance(ev, h2.events.ResponseReceived):
            self.events.append(_response(ev.headers or [], h11.Response))
            self.their_state = h11.SEND_BODY
        elif isinstance(ev, h2.events.DataReceived):
            if ev.data:
                self.events.append(h11.Data(data=ev.data))
            pad = (ev.flow_controlled_length or 0) - len(ev.data or b"")
            if pad > 0:  # padding is never consumed by the forwarder: give it back now
                self.h2.acknowledge_received_data(pad, self.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self._trailers = _trailers(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.events.append(h11.EndOfMessage(headers=self._trailers))
            self.their_state = h11.DONE
        elif isinstance(ev, h2.events.StreamReset):
            self.events.append(h11.ConnectionClosed())
            self.their_state = h11.DONE
            self.our_state = h11.DONE if self.our_state is h11.DONE else h11.ERROR


def _request_head(req: h11.Request) -> list[tuple[str, str]]:
    """An h11 request as HTTP/2 headers: Host becomes :authority, connection-specific fields
    go (RFC 9113 8.2.2), and a gRPC request says it takes trailers (`te`, as gRPC requires)."""
    headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in req.headers]
    authority = next((v for n, v in headers if n == "host"), "")
    out = [
        (":method", req.method.decode("latin-1")),
        (":scheme", "http"),
        (":authority", authority),
        (":path", req.target.decode("latin-1")),
    ]
    out += [(n, v) for n, v in headers if n not in HTTP2_HOP_BY_HOP]
    if any(n == "content-type" and v.startswith("application/grpc") for n, v in headers):
        out.append(("te", "trailers"))
    return out


def _response(headers: list[tuple[Any, Any]], kind: Any) -> Any:
    """An HTTP/2 response head as h11's Response (or InformationalResponse)."""
    status = 0
    out = []
    for n, v in headers:
        name = n.decode("latin-1") if isinstance(n, bytes) else n
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        if name == ":status":
            status = int(value)
        elif not name.startswith(":"):
            out.append((name, value))
    return kind(status_code=status, headers=out, reason=b"")
