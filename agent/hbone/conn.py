"""HBONE on the wire, sans-IO: HTTP/2 CONNECT streams over one mTLS connection (h2 inside).

Bytes in (`receive_data`), events out; frames to send accumulate for `data_to_send()`. No
sockets here, so a client and a server can be wired together in memory in tests.

Wire contract (design section 4, ztunnel-compatible): one CONNECT stream per proxied TCP
connection, `:authority <ip>:<port>`, headers `forwarded: for="<ip>:<port>"`, `baggage`,
`traceparent`; answers 200, 400 (not CONNECT, bad authority, authority not this pod),
401 (denied by policy), 503 (upstream connect failed). Settings in the range ztunnel uses:
stream window 4 MiB, connection window 16 MiB, max frame 1 MiB, at most 100 streams a client
opens on one connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100


# hyperframe renders every frame for a trace log line h2 computes eagerly; for DATA that meant
# hex-encoding a copy of the payload on every frame received (perf-notes: 40 % of the CPU).
def _data_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


hyperframe.frame.DataFrame._body_repr = _data_repr  # type: ignore[assignment,method-assign]


class HboneProtocolError(Exception):
    """The peer broke HTTP/2; the connection must be closed."""


def parse_authority(authority: str) -> tuple[str, int] | None:
    """`<ipv4>:<port>` (or `[ipv6]:port`) from a CONNECT authority; None if malformed."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    number = int(port)
    if not 0 < number < 65536:
        return None
    return str(ip), number


@dataclass(frozen=True)
class ConnectRequest:
    """A validated CONNECT (server side)."""

    stream_id: int
    target: tuple[str, int]
    headers: Mapping[str, str]

    @property
    def forwarded_for(self) -> tuple[str, int] | None:
        """The original client from `forwarded: for="ip:port"`, if present and well formed."""
        value = self.headers.get("forwarded", "")
        for part in value.split(";"):
            key, _, v = part.strip().partition("=")
            if key.lower() == "for":
                return parse_authority(v.strip('"'))
        return None


@dataclass(frozen=True)
class BadRequest:
    """A request stream to refuse with 400 (server side); `why` goes to the log."""

    stream_id: int
    why: str


def check_request(event: h2.events.RequestReceived) -> ConnectRequest | BadRequest:
    assert event.stream_id is not None
    headers = {_s(k): _s(v) for k, v in event.headers or []}
    if headers.get(":method") != "CONNECT":
        return BadRequest(event.stream_id, f"method {headers.get(':method')!r} is not CONNECT")
    target = parse_authority(headers.get(":authority", ""))
    if target is None:
        return BadRequest(event.stream_id, f"bad authority {headers.get(':authority')!r}")
    return ConnectRequest(
        event.stream_id, target, {k: v for k, v in headers.items() if not k.startswith(":")}
    )


def _s(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


@dataclass(frozen=True)
class Data:
    """Payload of a DATA frame (or part of one): a view into the decrypted read buffer.

    Valid until the next `receive_data()` call: consume it (or copy it) before that.
    """

    stream_id: int
    data: memoryview


@dataclass(frozen=True)
class WindowOpened:
    """The peer granted more send window (a stream's, or the connection's: stream_id 0)."""

    stream_id: int


DATA, WINDOW_UPDATE = 0x0, 0x8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
END_STREAM, PADDED = 0x1, 0x8
_HEADER = struct.Struct("!HBBBI")  # 24-bit length as (high 16, low 8), type, flags, stream id
Event = h2.events.Event | Data | WindowOpened


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id)


class HboneConnection:
    """One HBONE connection's HTTP/2 state (client or server role).

    h2 handles HEADERS (HPACK), SETTINGS, PING, RST_STREAM and GOAWAY. DATA and WINDOW_UPDATE
    frames are framed and parsed here directly, with flow control kept as integers: h2 would
    copy every payload several times and run its per-frame machinery (shared perf-notes), while
    a DATA frame is a 9-byte header in front of bytes we pass along untouched. h2 still learns
    when a stream ends: an END_STREAM is handed to it as an empty DATA frame.
    """

    def __init__(self, client: bool) -> None:
        self.client = client
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client,
                header_encoding=None,
                validate_inbound_headers=True,  # what peers send is checked
                normalize_inbound_headers=False,
                validate_outbound_headers=False,  # what we send is built here, well formed
                normalize_outbound_headers=False,
            )
        )
        self.h2.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000 if not client else 100,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # h2 tracks the inbound frame limit apart from local_settings; these settings are sent
        # in the connection preface, so they hold from the first frame the peer sends.
        self.h2.max_inbound_frame_size = MAX_FRAME
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._out = bytearray()
        # Send side: what the peer allows us (its SETTINGS and WINDOW_UPDATEs).
        self._send_conn = 65535
        self._send: dict[int, int] = {}
        # Receive side: what we allowed and what the consumer has taken but we not yet granted.
        self._recv_conn = CONNECTION_WINDOW
        self._recv: dict[int, int] = {}
        self._unacked_conn = 0
        self._unacked: dict[int, int] = {}
        # Frame parsing state across reads.
        self._pending = bytearray()  # a partial frame header, or a whole non-DATA frame
        self._data_left = 0  # bytes of the current DATA frame body still to come
        self._data_sid = 0
        self._data_end = False
        self._preface_left = 0 if client else len(PREFACE)  # a server first reads the preface

    # -- client side ---------------------------------------------------------------------

    def connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Open a CONNECT stream; returns its id."""
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id, [(":method", "CONNECT"), (":authority", authority), *headers]
        )
        self._open(stream_id)
        return stream_id

    def _open(self, stream_id: int) -> None:
        self._send[stream_id] = self.h2.remote_settings.initial_window_size
        self._recv[stream_id] = STREAM_WINDOW
        self._unacked[stream_id] = 0

    @property
    def open_streams(self) -> int:
        return int(self.h2.open_outbound_streams if self.client else self.h2.open_inbound_streams)

    def can_open_stream(self) -> bool:
        remote_max = self.h2.remote_settings.max_concurrent_streams
        return (
            self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED
            and self.open_streams < min(MAX_STREAMS, remote_max)
        )

    # -- server side ---------------------------------------------------------------------

    def respond(self, stream_id: int, status: int, end_stream: bool = False) -> None:
        self.h2.send_headers(stream_id, [(":status", str(status))], end_stream=end_stream)

    # -- sending DATA ----------------------------------------------------------------------

    def send_window(self, stream_id: int) -> int:
        """DATA bytes the peer accepts on the stream now; -1 if the stream is gone."""
        window = self._send.get(stream_id)
        if window is None:
            return -1
        return max(0, min(window, self._send_conn))

    def data_header(self, stream_id: int, length: int) -> bytes:
        """Account `length` bytes against the windows and return the DATA frame header.

        The caller writes the header, then the payload itself, right after `data_to_send()`;
        `length` must fit `send_window()` and the peer's max frame size.
        """
        self._send[stream_id] -= length
        self._send_conn -= length
        return frame_header(length, DATA, 0, stream_id)

    @property
    def max_frame(self) -> int:
        return int(self.h2.max_outbound_frame_size)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: the sender will send no more data (TCP FIN)."""
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.end_stream(stream_id)

    def reset(
        self, stream_id: int, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.CANCEL
    ) -> None:
        """Abort a stream (TCP RST)."""
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)

    def forget(self, stream_id: int, unconsumed: int = 0) -> None:
        """The stream is done: give the connection window back everything it still holds.

        That is what was consumed but not yet granted, and what was received but never
        consumed (`unconsumed`: a stream reset or closed with data still buffered). Without
        this, every abandoned stream would shrink a long-lived tunnel's window for good.
        """
        self._send.pop(stream_id, None)
        self._recv.pop(stream_id, None)
        left = self._unacked.pop(stream_id, 0) + unconsumed
        if left:
            self._grant_conn(left)

    # -- receiving DATA --------------------------------------------------------------------

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The consumer took `length` bytes: grant them again, in batches of half a window."""
        if not length:
            return
        if stream_id in self._unacked:
            self._unacked[stream_id] += length
            if self._unacked[stream_id] >= STREAM_WINDOW // 2:
                grant, self._unacked[stream_id] = self._unacked[stream_id], 0
                self._recv[stream_id] += grant
                self._frame(frame_header(4, WINDOW_UPDATE, 0, stream_id) + grant.to_bytes(4, "big"))
        self._grant_conn(length)

    def _grant_conn(self, length: int) -> None:
        self._unacked_conn += length
        if self._unacked_conn >= CONNECTION_WINDOW // 2:
            grant, self._unacked_conn = self._unacked_conn, 0
            self._recv_conn += grant
            self._frame(frame_header(4, WINDOW_UPDATE, 0, 0) + grant.to_bytes(4, "big"))

    def _frame(self, frame: bytes) -> None:
        self._out += self.h2.data_to_send()  # keep h2's frames ahead of ours, in order
        self._out += frame

    def close(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse received bytes: DATA and WINDOW_UPDATE here, every other frame through h2."""
        try:
            return self._receive(memoryview(data))
        except h2.exceptions.ProtocolError as e:
            raise HboneProtocolError(str(e)) from e

    def _receive(self, view: memoryview) -> list[Event]:
        events: list[Event] = []
        pos, end = 0, len(view)
        if self._preface_left:
            take = min(self._preface_left, end)
            self._preface_left -= take
            events += self._h2(bytes(view[:take]))  # h2 checks the client connection preface
            pos = take
        while pos < end:
            if self._data_left:  # inside a DATA frame body: pass the payload through
                take = min(self._data_left, end - pos)
                self._data_left -= take
                if self._data_sid in self._recv:
                    events.append(Data(self._data_sid, view[pos : pos + take]))
                else:  # a stream we dropped: give the window back at once
                    self._grant_conn(take)
                pos += take
                if not self._data_left and self._data_end:
                    events += self._end_stream(self._data_sid)
                continue
            need = 9 - len(self._pending)
            if need > 0:
                self._pending += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._pending) < 9:
                    break
            hi, lo, ftype, flags, sid = _HEADER.unpack_from(self._pending)
            length, sid = (hi << 8) | lo, sid & 0x7FFFFFFF
            if length > MAX_FRAME:
                raise HboneProtocolError(f"frame of {length} bytes exceeds our maximum")
            if ftype == DATA and not flags & PADDED:
                self._pending.clear()
                self._account(sid, length)
                if length == 0:
                    if flags & END_STREAM:
                        events += self._end_stream(sid)
                    continue
                self._data_left, self._data_sid = length, sid
                self._data_end = bool(flags & END_STREAM)
                continue
            body_need = 9 + length - len(self._pending)
            if body_need > 0:
                self._pending += view[pos : pos + body_need]
                pos += min(body_need, end - pos)
                if len(self._pending) < 9 + length:
                    break
            frame = bytes(self._pending)
            self._pending.clear()
            if ftype == WINDOW_UPDATE:
                events += self._window_update(sid, frame[9:13])
            elif ftype == DATA:  # padded: rare, strip the padding here
                self._account(sid, length)
                pad = frame[9]
                payload = memoryview(frame)[10 : 9 + length - pad]
                if payload and sid in self._recv:
                    events.append(Data(sid, payload))
                    self._unacked_extra(sid, length - len(payload))
                else:
                    self._grant_conn(length)
                if flags & END_STREAM:
                    events += self._end_stream(sid)
            else:
                events += self._h2(frame)
        return events

    def _unacked_extra(self, sid: int, n: int) -> None:
        if n:
            self.acknowledge(sid, n)  # padding counts against the window; give it back

    def _account(self, sid: int, length: int) -> None:
        self._recv_conn -= length
        if self._recv_conn < 0:
            raise HboneProtocolError("peer exceeded the connection flow-control window")
        if sid in self._recv:
            self._recv[sid] -= length
            if self._recv[sid] < 0:
                raise HboneProtocolError(f"peer exceeded the window of stream {sid}")

    def _end_stream(self, sid: int) -> list[Event]:
        # h2 keeps the stream states: tell it about END_STREAM with an empty DATA frame.
        return self._h2(frame_header(0, DATA, END_STREAM, sid))

    def _window_update(self, sid: int, payload: bytes) -> list[Event]:
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            self._send_conn += increment
        elif sid in self._send:
            self._send[sid] += increment
        else:
            return []
        return [WindowOpened(sid)]

    def _h2(self, frame: bytes) -> list[Event]:
        events: list[Event] = []
        for ev in self.h2.receive_data(frame):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                change = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
                if change is not None and change.original_value is not None:
                    delta = change.new_value - change.original_value
                    for s in self._send:
                        self._send[s] += delta
                events.append(ev)
            elif isinstance(ev, h2.events.RequestReceived):
                assert ev.stream_id is not None
                self._open(ev.stream_id)
                events.append(ev)
            elif isinstance(ev, h2.events.DataReceived):
                continue  # only our empty END_STREAM frames reach h2
            elif isinstance(ev, h2.events.StreamReset | h2.events.StreamEnded):
                events.append(ev)
            else:
                events.append(ev)
        return events

    def data_to_send(self) -> bytes:
        out = self._out + self.h2.data_to_send() if self._out else self.h2.data_to_send()
        self._out = bytearray()
        return bytes(out)
