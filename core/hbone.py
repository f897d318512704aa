"""HBONE on the wire, sans-IO: HTTP/2 CONNECT streams over one mTLS connection.

Bytes in (`receive_data`), events out; frames to send accumulate for `data_to_send()`. No
sockets here, so a client and a server can be wired together in memory in tests.

Wire contract (design section 4, ztunnel-compatible): one CONNECT stream per proxied TCP
connection, `:authority <ip>:<port>`, headers `forwarded: for="<ip>:<port>"`, `baggage`,
`traceparent`; answers 200, 400 (not CONNECT, bad authority, authority not this pod),
401 (denied by policy), 503 (upstream connect failed). Settings in the range ztunnel uses:
stream window 4 MiB, connection window 16 MiB, max frame 1 MiB, at most 100 streams a client
opens on one connection.

Why not the h2 library: HBONE uses a small corner of HTTP/2 (CONNECT streams, no push, no
priorities, no trailers), and h2's general stream machinery cost ~120 us of CPU per proxied
connection and side - as much as everything else the agent does for it (bench/README.md).
This module implements RFC 9113 for that corner: every frame type is parsed and checked
(unknown types are ignored, as the RFC asks), SETTINGS/PING are answered, flow control is
two integers per stream, and HPACK is the `hpack` library's decoder. Outbound header blocks
are encoded as literals that never touch the dynamic table, so the peer's table size does
not matter and encoding is a few byte appends.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import hpack
import hpack.exceptions

from veil.core.grammar import port_number

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100  # a client opens at most this many on one connection
MAX_INBOUND_STREAMS = 100  # a server accepts at most this many at once (as our SETTINGS say)
MAX_HEADER_BLOCK = 64 * 1024  # one header block, CONTINUATIONs included
# On a CONNECT to a waypoint from a destination pod's agent: it carries a connection that came
# from outside the mesh (`veil.dev/ingress-use-waypoint`); believed of that pod's identity only.
INGRESS_HEADER = "veil-ingress"
# Floods a peer can send cheaply and we pay for (each ends the connection with
# ENHANCE_YOUR_CALM; the limits are Envoy's and nghttp2's, where they have one):
MAX_QUEUED_CONTROL = 1000  # our answers (PING/SETTINGS ACK, RST_STREAM) the peer leaves unread
MAX_PRIORITY_PER_STREAM = 100  # PRIORITY frames per stream the peer opened (plus one)
MAX_EMPTY_FRAMES = 16  # DATA/HEADERS/CONTINUATION in a row with no payload that end nothing
MAX_CONTINUATIONS = 32  # CONTINUATION frames in one header block
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
_SELF_DEPENDENT = 0x100  # not a wire flag: marks a HEADERS frame whose stream depends on itself
# Settings identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER = struct.Struct("!HBBBI")  # 24-bit length as (high 16, low 8), type, flags, stream id
_SETTING = struct.Struct("!HI")
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
_CARRIERS = frozenset({DATA, HEADERS, CONTINUATION})  # frames whose payload is the point
_REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":protocol"})


class HboneProtocolError(Exception):
    """The peer broke HTTP/2; a GOAWAY is queued and the connection must be closed."""

    def __init__(self, why: str, code: ErrorCode) -> None:
        super().__init__(why)
        self.code = code


def parse_authority(authority: str) -> tuple[str, int] | None:
    """`<ipv4>:<port>` (or `[ipv6]:port`) from a CONNECT authority; None if malformed."""
    host, sep, port = authority.rpartition(":")
    number = port_number(port) if sep else None
    if number is None:
        return None
    try:  # the common case, a canonical IPv4 address, without ipaddress's parser
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, host)) == host:
            return host, number
    except OSError:
        pass
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return str(ip), number


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A peer opened a stream (server side); headers in order, decoded as latin-1."""

    stream_id: int
    headers: Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The final answer to a stream we opened (client side)."""

    stream_id: int
    status: int
    headers: Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent END_STREAM: it sends nothing more on the stream (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was reset, by the peer or because it broke the protocol (TCP RST)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY."""

    error_code: int
    last_stream_id: int


@dataclass(frozen=True, slots=True)
class Data:
    """Payload of a DATA frame (or part of one): a view into the decrypted read buffer.

    Valid until the next `receive_data()` call: consume it (or copy it) before that.
    """

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted more send window (a stream's, or the connection's: stream_id 0)."""

    stream_id: int


Event = (
    RequestReceived
    | ResponseReceived
    | StreamEnded
    | StreamReset
    | ConnectionTerminated
    | Data
    | WindowOpened
)


# -- requests -----------------------------------------------------------------------------


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


def check_request(event: RequestReceived) -> ConnectRequest | BadRequest:
    headers = dict(event.headers)
    if headers.get(":method") != "CONNECT":
        return BadRequest(event.stream_id, f"method {headers.get(':method')!r} is not CONNECT")
    target = parse_authority(headers.get(":authority", ""))
    if target is None:
        return BadRequest(event.stream_id, f"bad authority {headers.get(':authority')!r}")
    return ConnectRequest(
        event.stream_id, target, {k: v for k, v in headers.items() if not k.startswith(":")}
    )


# -- HPACK, the sending half ----------------------------------------------------------------


def _hpack_int(value: int, prefix: int, flags: int = 0) -> bytes:
    """RFC 7541 section 5.1: an integer with an N-bit prefix."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_NAMES: dict[str, int] = {}
for _i, (_name, _) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, start=1):
    _STATIC_NAMES.setdefault(_name.decode(), _i)
_STATUS_INDEXED = {200: b"\x88", 204: b"\x89", 206: b"\x8a", 304: b"\x8b", 400: b"\x8c"}


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing (section 6.2.2), no Huffman coding.

    Never touching the dynamic table keeps the encoder stateless: nothing to synchronise with
    the peer's decoder and no table-size updates to signal. HBONE headers are few and short;
    most repeat from one CONNECT to the next (method, authority, baggage), so encoded fields
    are kept in a small cache.
    """
    parts = []
    for field in headers:
        encoded = _FIELDS.get(field)
        if encoded is None:
            encoded = _encode_field(*field)
            if field[0] not in _UNIQUE:
                if len(_FIELDS) >= 512:
                    _FIELDS.clear()
                _FIELDS[field] = encoded
        parts.append(encoded)
    return b"".join(parts)


_FIELDS: dict[tuple[str, str], bytes] = {}
_UNIQUE = frozenset({"forwarded", "traceparent"})  # new on every CONNECT: not worth keeping


def _encode_field(name: str, value: str) -> bytes:
    index = _STATIC_NAMES.get(name)
    if index is None:
        raw = name.encode("latin-1")
        head = b"\x00" + _hpack_int(len(raw), 7) + raw
    else:
        head = _hpack_int(index, 4)
    raw = value.encode("latin-1")
    return head + _hpack_int(len(raw), 7) + raw


# -- HPACK, the receiving half: a fast path for what `encode_headers` writes ------------------

_STATIC = [(n.decode(), v.decode()) for n, v in hpack.table.HeaderTable.STATIC_TABLE]


def _read_int(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    limit = (1 << prefix) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block) or shift > 28:
            raise IndexError("truncated integer")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode_plain(block: bytes) -> list[tuple[str, str]] | None:
    """Decode a block made only of static-table entries and plain (not Huffman) literals
    that are not indexed; None if it uses anything else (the dynamic table, Huffman, a size
    update) or looks broken. Such blocks change no decoder state, so a None costs nothing
    but the retry with hpack's full decoder, which then also reports any error.

    Integers that fit their prefix (all of an HBONE CONNECT's, whose strings are short) are
    read without a call: this runs once per proxied connection."""
    out: list[tuple[str, str]] = []
    pos, end = 0, len(block)
    static = _STATIC
    try:
        while pos < end:
            first = block[pos]
            if first & 0x80:  # an indexed field
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _read_int(block, pos, 7)
                else:
                    pos += 1
                if not 0 < index <= len(static):
                    return None
                out.append(static[index - 1])
                continue
            if first & 0xE0:  # incremental indexing or a table size update
                return None
            index = first & 0x0F  # literal, without or never indexed
            if index == 0x0F:
                index, pos = _read_int(block, pos, 4)
            else:
                pos += 1
            if index:
                if index > len(static):
                    return None
                name: str | None = static[index - 1][0]
            else:
                name, pos = _read_str(block, pos)
            value, pos = _read_str(block, pos)
            if name is None or value is None:
                return None
            out.append((name, value))
    except IndexError:
        return None
    return out


def _read_str(block: bytes, pos: int) -> tuple[str | None, int]:
    """A plain string literal (section 5.2); None if Huffman coded. IndexError if cut."""
    length = block[pos]
    if length & 0x80:  # Huffman coded
        return None, pos
    if length == 0x7F:
        length, pos = _read_int(block, pos, 7)
    else:
        pos += 1
    if pos + length > len(block):
        raise IndexError("truncated string")
    return block[pos : pos + length].decode("latin-1"), pos + length


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id)


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, why: str) -> None:
        super().__init__(why)
        self.code = code


# Stream states, as bits: what each side has finished (RFC 9113 section 5.1).
_LOCAL_END, _REMOTE_END, _ANSWERED = 0x1, 0x2, 0x4


class HboneConnection:
    """One HBONE connection's HTTP/2 state (client or server role).

    Streams are open from HEADERS until both sides sent END_STREAM or one reset it; their
    flow-control windows live until the consumer `forget()`s them (it may still hold data).
    """

    def __init__(self, client: bool) -> None:
        self.client = client
        self._out = bytearray()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_BLOCK
        # Open streams: id -> state bits. A client opens odd ids, a server never opens any.
        self._state: dict[int, int] = {}
        self._held: dict[int, bytearray] = {}  # answers waiting for their stream's data
        self._next_sid = 1
        self._last_peer_sid = 0
        self._goaway_sent = self._goaway_received = False
        # What the peer told us (defaults until its SETTINGS arrive).
        self._peer_window = DEFAULT_WINDOW
        self._peer_frame = DEFAULT_FRAME
        self._peer_streams = MAX_WINDOW
        # Send side: what the peer allows us (its SETTINGS and WINDOW_UPDATEs).
        self._send_conn = DEFAULT_WINDOW
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
        self._settings_seen = False  # the peer's first frame must be SETTINGS
        self._headers_sid = 0  # a header block continues in CONTINUATION frames
        self._headers_flags = 0
        self._headers_block = bytearray()
        self._continuations = 0
        self.frames_received = 0  # the I/O layer yields to other tunnels after many
        # Flood accounting (see MAX_QUEUED_CONTROL and the limits beside it).
        self._control_queued = 0
        self._priority_frames = 0
        self._streams_opened = 0
        self._empty_run = 0
        # Our settings hold from the first frame the peer sends: they lead our preface.
        settings = [
            (INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (MAX_FRAME_SIZE, MAX_FRAME),
            (MAX_CONCURRENT_STREAMS, MAX_STREAMS if client else MAX_INBOUND_STREAMS),
            (ENABLE_PUSH, 0),
            (MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
        ]
        payload = b"".join(_SETTING.pack(k, v) for k, v in settings)
        if client:
            self._out += PREFACE
        self._frame(SETTINGS, 0, 0, payload)
        self._frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self._out += frame_header(len(payload), ftype, flags, sid)
        self._out += payload

    # -- client side ---------------------------------------------------------------------

    def connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Open a CONNECT stream; returns its id."""
        return self.request([(":method", "CONNECT"), (":authority", authority), *headers])

    def request(self, headers: Sequence[tuple[str, str]], end_stream: bool = False) -> int:
        """Open a stream with these headers (pseudo-headers first); returns its id."""
        assert self.client, "only a client opens streams"
        sid = self._next_sid
        self._next_sid += 2
        self._streams_opened += 1
        self._state[sid] = 0
        self._open(sid)
        self._headers(sid, encode_headers(headers), end_stream)
        return sid

    def _open(self, stream_id: int) -> None:
        self._send[stream_id] = self._peer_window
        self._recv[stream_id] = STREAM_WINDOW
        self._unacked[stream_id] = 0

    def _headers(self, sid: int, block: bytes, end_stream: bool, hold: bool = False) -> None:
        if end_stream:
            self._local_end(sid)
        flags = END_STREAM if end_stream else 0
        out = self._out
        if hold:
            out = self._held[sid] = bytearray()
        chunk = self._peer_frame
        if len(block) <= chunk:
            out += frame_header(len(block), HEADERS, flags | END_HEADERS, sid) + block
            return
        out += frame_header(chunk, HEADERS, flags, sid) + block[:chunk]
        for i in range(chunk, len(block), chunk):
            part = block[i : i + chunk]
            last = i + chunk >= len(block)
            out += frame_header(len(part), CONTINUATION, END_HEADERS if last else 0, sid) + part

    def _release(self, sid: int) -> None:
        """A held answer leaves now, ahead of the stream's next frame."""
        held = self._held.pop(sid, None)
        if held is not None:
            self._out += held

    @property
    def open_streams(self) -> int:
        return len(self._state)

    def can_open_stream(self) -> bool:
        return (
            not self._goaway_sent
            and not self._goaway_received
            and self._next_sid <= MAX_WINDOW
            and len(self._state) < min(MAX_STREAMS, self._peer_streams)
        )

    def ping(self) -> None:
        """Ask the peer for a PING ACK: whatever it sends back proves it is there."""
        self._frame(PING, 0, 0, b"veil-png")

    # -- server side ---------------------------------------------------------------------

    def respond(
        self, stream_id: int, status: int, end_stream: bool = False, hold: bool = False
    ) -> None:
        """Answer a request; a no-op if the stream is already gone (reset by the peer).

        `hold`: the answer waits for the stream's first DATA or END_STREAM and leaves in front
        of it, not with other frames. For a client that sent data with its CONNECT (so did not
        wait for the answer): a request answered at once then crosses back as one packet.
        Answers may overtake each other: our header blocks never touch the HPACK table.
        """
        state = self._state.get(stream_id)
        if state is None or state & _ANSWERED:
            return
        self._state[stream_id] = state | _ANSWERED
        block = _STATUS_INDEXED.get(status) or encode_headers([(":status", str(status))])
        self._headers(stream_id, block, end_stream, hold and not end_stream)

    # -- sending DATA ----------------------------------------------------------------------

    def send_window(self, stream_id: int) -> int:
        """DATA bytes the peer accepts on the stream now; -1 if the stream is gone."""
        window = self._send.get(stream_id)
        if window is None or self._state.get(stream_id, _LOCAL_END) & _LOCAL_END:
            return -1
        return max(0, min(window, self._send_conn))

    def data_header(self, stream_id: int, length: int) -> bytes:
        """Account `length` bytes against the windows and return the DATA frame header.

        The caller writes the header, then the payload itself, right after `data_to_send()`;
        `length` must fit `send_window()` and `max_frame`.
        """
        if self._held:
            self._release(stream_id)
        self._send[stream_id] -= length
        self._send_conn -= length
        return frame_header(length, DATA, 0, stream_id)

    def data_frame(self, stream_id: int, payload: bytes | memoryview) -> None:
        """Queue a whole DATA frame with the other pending frames (`data_to_send()`), for
        small payloads: one TLS record for everything pending costs less than a record per
        piece. `len(payload)` must fit `send_window()` and `max_frame`."""
        self._out += self.data_header(stream_id, len(payload))
        self._out += payload

    @property
    def max_frame(self) -> int:
        return self._peer_frame

    @property
    def pending_output(self) -> int:
        """Bytes of frames queued and not yet taken by `data_to_send()`."""
        return len(self._out)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: the sender will send no more data (TCP FIN)."""
        state = self._state.get(stream_id)
        if state is not None and not state & _LOCAL_END:
            self._release(stream_id)
            self._frame(DATA, END_STREAM, stream_id)
            self._local_end(stream_id)

    def _local_end(self, sid: int) -> None:
        state = self._state[sid] | _LOCAL_END
        if state & _REMOTE_END:
            del self._state[sid]
        else:
            self._state[sid] = state

    def reset(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort a stream (TCP RST); a no-op on a stream that is already closed. A held answer
        leaves first: the app did accept the connection before it went away."""
        self._release(stream_id)
        if self._state.pop(stream_id, None) is not None:
            self._frame(RST_STREAM, 0, stream_id, int(code).to_bytes(4, "big"))

    def forget(self, stream_id: int, unconsumed: int = 0) -> None:
        """The stream is done: give the connection window back everything it still holds.

        That is what was consumed but not yet granted, and what was received but never
        consumed (`unconsumed`: a stream reset or closed with data still buffered). Without
        this, every abandoned stream would shrink a long-lived tunnel's window for good. A
        stream the peer has not finished is reset: NO_ERROR once we answered or ended it
        (section 8.1: the peer may stop sending), CANCEL otherwise.
        """
        state = self._state.get(stream_id)
        if state is not None:
            done = state & (_LOCAL_END | _ANSWERED)
            self.reset(stream_id, ErrorCode.NO_ERROR if done else ErrorCode.CANCEL)
        self._held.pop(stream_id, None)
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
        unacked = self._unacked.get(stream_id)
        if unacked is not None:
            unacked += length
            if unacked >= STREAM_WINDOW // 2:
                self._recv[stream_id] += unacked
                self._frame(WINDOW_UPDATE, 0, stream_id, unacked.to_bytes(4, "big"))
                unacked = 0
            self._unacked[stream_id] = unacked
        self._grant_conn(length)

    def _grant_conn(self, length: int) -> None:
        self._unacked_conn += length
        if self._unacked_conn >= CONNECTION_WINDOW // 2:
            grant, self._unacked_conn = self._unacked_conn, 0
            self._recv_conn += grant
            self._frame(WINDOW_UPDATE, 0, 0, grant.to_bytes(4, "big"))

    def notice_shutdown(self) -> None:
        """A server's first GOAWAY of a graceful shutdown (RFC 9113 section 6.8): last stream
        2^31-1, so streams already on their way are still taken; the client opens no new one
        here. `close()` later sends the final GOAWAY with the real last stream."""
        if not self._goaway_sent and not self.client:
            self._frame(GOAWAY, 0, 0, struct.pack("!II", MAX_WINDOW, int(ErrorCode.NO_ERROR)))

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Send GOAWAY: no new streams either way."""
        if not self._goaway_sent:
            self._goaway_sent = True
            self._frame(GOAWAY, 0, 0, struct.pack("!II", self._last_peer_sid, int(code)))

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Parse received bytes into events; HboneProtocolError (GOAWAY queued) if broken."""
        try:
            return self._receive(memoryview(data))
        except _ConnectionError as e:
            self.close(e.code)
            raise HboneProtocolError(f"{e.code.name}: {e}", e.code) from None
        except hpack.exceptions.HPACKError as e:
            self.close(ErrorCode.COMPRESSION_ERROR)
            raise HboneProtocolError(
                f"COMPRESSION_ERROR: {e}", ErrorCode.COMPRESSION_ERROR
            ) from None

    def _receive(self, view: memoryview) -> list[Event]:
        events: list[Event] = []
        pos, end = 0, len(view)
        if self._preface_left:
            take = min(self._preface_left, end)
            start = len(PREFACE) - self._preface_left
            if view[:take] != PREFACE[start : start + take]:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            self._preface_left -= take
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
                    self._remote_end(self._data_sid, events)
                continue
            need = 9 - len(self._pending)
            if need > 0:
                self._pending += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._pending) < 9:
                    break
            hi, lo, ftype, flags, sid = _HEADER.unpack_from(self._pending)
            self.frames_received += 1
            length, sid = (hi << 8) | lo, sid & 0x7FFFFFFF
            if length > MAX_FRAME:
                raise _ConnectionError(
                    ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our maximum"
                )
            if not self._settings_seen and ftype != SETTINGS:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "the first frame is not SETTINGS")
            if length:
                self._empty_run = 0
            elif ftype in _CARRIERS and not flags & (END_STREAM | END_HEADERS):
                self._empty_run += 1
                if self._empty_run > MAX_EMPTY_FRAMES:
                    raise _ConnectionError(
                        ErrorCode.ENHANCE_YOUR_CALM, "a flood of frames with empty payloads"
                    )
            if self._headers_sid and ftype != CONTINUATION:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
            if ftype == DATA and not flags & PADDED:
                self._pending.clear()
                self._data_frame(sid, length)
                if length == 0:
                    if flags & END_STREAM:
                        self._remote_end(sid, events)
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
            payload = bytes(self._pending[9:])
            self._pending.clear()
            self._control_frame(ftype, flags, sid, payload, events)
        return events

    # -- frames other than unpadded DATA ---------------------------------------------------

    def _control_frame(
        self, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        if ftype == WINDOW_UPDATE:
            self._window_update(sid, payload, events)
        elif ftype == HEADERS:
            self._headers_frame(sid, flags, payload, events)
        elif ftype == CONTINUATION:
            if not self._headers_sid or sid != self._headers_sid:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._continuations += 1
            if self._continuations > MAX_CONTINUATIONS:
                raise _ConnectionError(
                    ErrorCode.ENHANCE_YOUR_CALM, "too many CONTINUATION frames in a header block"
                )
            self._block_fragment(payload, flags, events)
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed RST_STREAM")
            if self._is_idle(sid):  # RFC 9113 5.1: idle streams take HEADERS or PRIORITY only
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            if self._state.pop(sid, None) is not None:
                events.append(StreamReset(sid, int.from_bytes(payload, "big")))
        elif ftype == SETTINGS:
            self._settings(sid, flags, payload, events)
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed PING")
            if not flags & ACK:
                self._frame(PING, ACK, 0, payload)
                self._control_answered()
        elif ftype == GOAWAY:
            if sid != 0 or len(payload) < 8:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY")
            last, code = struct.unpack_from("!II", payload)
            self._goaway_received = True
            events.append(ConnectionTerminated(code, last & 0x7FFFFFFF))
        elif ftype == DATA:  # padded: rare, strip the padding here
            self._data_frame(sid, len(payload))
            body = self._unpad(payload)
            if body and sid in self._recv:
                events.append(Data(sid, memoryview(body)))
                self.acknowledge(sid, len(payload) - len(body))  # padding is flow-controlled
            else:
                self._grant_conn(len(payload))
            if flags & END_STREAM:
                self._remote_end(sid, events)
        elif ftype == PRIORITY:
            if sid == 0 or len(payload) != 5:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed PRIORITY")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:  # RFC 9113 5.3.1
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            self._priority_frames += 1
            if self._priority_frames > MAX_PRIORITY_PER_STREAM * (1 + self._streams_opened):
                raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "a flood of PRIORITY frames")
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # Unknown frame types are ignored (section 4.1).

    @staticmethod
    def _unpad(payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding exceeds the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data_frame(self, sid: int, length: int) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_conn -= length
        if self._recv_conn < 0:
            raise _ConnectionError(
                ErrorCode.FLOW_CONTROL_ERROR, "peer exceeded the connection flow-control window"
            )
        if sid in self._recv:
            self._recv[sid] -= length
            if self._recv[sid] < 0:
                raise _ConnectionError(
                    ErrorCode.FLOW_CONTROL_ERROR, f"peer exceeded the window of stream {sid}"
                )
        elif self._is_idle(sid):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")

    def _is_idle(self, sid: int) -> bool:
        return sid >= self._next_sid if self.client else sid > self._last_peer_sid

    def _remote_end(self, sid: int, events: list[Event]) -> None:
        state = self._state.get(sid)
        if state is None or state & _REMOTE_END:
            return
        if state & _LOCAL_END:
            del self._state[sid]
        else:
            self._state[sid] = state | _REMOTE_END
        events.append(StreamEnded(sid))

    def _window_update(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of a wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid and self._is_idle(sid):  # RFC 9113 5.1
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        if increment == 0:  # RFC 9113 6.9: a PROTOCOL_ERROR, of the connection or the stream
            if sid == 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        if sid == 0:
            if self._send_conn + increment > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "bad connection window")
            self._send_conn += increment
        elif sid in self._send:
            if self._send[sid] + increment > MAX_WINDOW:
                self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR, events)
                return
            self._send[sid] += increment
        else:
            return
        events.append(WindowOpened(sid))

    def _stream_error(self, sid: int, code: ErrorCode, events: list[Event]) -> None:
        if sid in self._state:
            self.reset(sid, code)
            events.append(StreamReset(sid, int(code)))
        else:
            self._frame(RST_STREAM, 0, sid, int(code).to_bytes(4, "big"))
        self._control_answered()

    def _control_answered(self) -> None:
        """Count a frame queued only because the peer sent one; a peer that keeps sending
        them without reading our answers would grow our output without bound."""
        self._control_queued += 1
        if self._control_queued > MAX_QUEUED_CONTROL:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"over {MAX_QUEUED_CONTROL} answers to control frames left unread",
            )

    def output_drained(self) -> None:
        """The I/O layer sent everything queued: the peer reads, its answers are gone."""
        self._control_queued = 0

    def _settings(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if sid != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS of a wrong size")
        self._settings_seen = True
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window above 2^31-1")
                delta, self._peer_window = value - self._peer_window, value
                for s in self._send:
                    self._send[s] += delta
                    if self._send[s] > MAX_WINDOW:
                        raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                if delta:
                    events.append(WindowOpened(0))
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self._peer_frame = min(value, MAX_FRAME)
            elif key == MAX_CONCURRENT_STREAMS:
                self._peer_streams = value
            elif key == ENABLE_PUSH and value > 1:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            # HEADER_TABLE_SIZE: our encoder never uses the dynamic table. Others: advisory.
        self._frame(SETTINGS, ACK, 0)
        self._control_answered()

    # -- header blocks -------------------------------------------------------------------------

    def _headers_frame(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = self._unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS priority truncated")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:  # RFC 9113 5.3.1
                flags |= _SELF_DEPENDENT  # a stream error, once the block is decoded
            payload = payload[5:]
        self._headers_sid, self._headers_flags = sid, flags
        self._continuations = 0
        self._block_fragment(payload, flags, events)

    def _block_fragment(self, fragment: bytes, flags: int, events: list[Event]) -> None:
        self._headers_block += fragment
        if len(self._headers_block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if not flags & END_HEADERS:
            return
        sid, first_flags = self._headers_sid, self._headers_flags
        block = bytes(self._headers_block)
        self._headers_sid, self._headers_block = 0, bytearray()
        # Decode even for streams we ignore: the peer's HPACK table must stay in step.
        headers = decode_plain(block)
        if headers is None:
            headers = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in self._decoder.decode(block, raw=True)
            ]
        if first_flags & _SELF_DEPENDENT and not self.client:
            if sid % 2 == 0 or (sid <= self._last_peer_sid and sid not in self._state):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS opening stream {sid}")
            self._last_peer_sid = max(self._last_peer_sid, sid)
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
        elif self.client:
            self._response(sid, headers, bool(first_flags & END_STREAM), events)
        else:
            self._request(sid, headers, bool(first_flags & END_STREAM), events)

    def _request(
        self, sid: int, headers: list[tuple[str, str]], end: bool, events: list[Event]
    ) -> None:
        if sid in self._state:  # trailers: CONNECT has none, but an end is an end
            if end:
                self._remote_end(sid, events)
            else:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        if sid % 2 == 0 or sid <= self._last_peer_sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS opening stream {sid}")
        self._last_peer_sid = sid
        self._streams_opened += 1
        if self._goaway_sent or len(self._state) >= MAX_INBOUND_STREAMS:
            self._frame(RST_STREAM, 0, sid, int(ErrorCode.REFUSED_STREAM).to_bytes(4, "big"))
            self._control_answered()
            return
        if _malformed(headers, _REQUEST_PSEUDO) or _bad_request_pseudo(headers):
            self._frame(RST_STREAM, 0, sid, int(ErrorCode.PROTOCOL_ERROR).to_bytes(4, "big"))
            self._control_answered()
            return
        self._state[sid] = 0
        self._open(sid)
        events.append(RequestReceived(sid, headers))
        if end:
            self._remote_end(sid, events)

    def _response(
        self, sid: int, headers: list[tuple[str, str]], end: bool, events: list[Event]
    ) -> None:
        state = self._state.get(sid)
        if state is None:
            if self._is_idle(sid):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
            return  # a stream we already closed or reset
        if state & _ANSWERED:  # trailers
            if end:
                self._remote_end(sid, events)
            else:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        status = headers[0][1] if headers and headers[0][0] == ":status" else ""
        if not (status.isdigit() and len(status) == 3) or _malformed(headers, {":status"}):
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        code = int(status)
        if 100 <= code < 200:  # informational: the final answer follows
            if end:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        self._state[sid] = state | _ANSWERED
        events.append(ResponseReceived(sid, code, headers))
        if end:
            self._remote_end(sid, events)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out


def _bad_request_pseudo(headers: list[tuple[str, str]]) -> bool:
    """RFC 9113 8.3.1 and 8.5: `:method` always; a CONNECT without `:scheme` and `:path`;
    any other method with both, `:path` not empty. Malformed: a stream error."""
    pseudo = {n: v for n, v in headers if n.startswith(":")}
    method = pseudo.get(":method")
    if not method:
        return True
    if method == "CONNECT" and ":protocol" not in pseudo:
        return ":scheme" in pseudo or ":path" in pseudo
    return not pseudo.get(":scheme") or not pseudo.get(":path")


def _malformed(headers: list[tuple[str, str]], pseudo: frozenset[str] | set[str]) -> bool:
    """Section 8.2: lowercase names, known pseudo-headers first and once each (a repeated
    `:authority` would leave which one wins to the reader), no connection headers."""
    regular = False
    seen: set[str] = set()
    for name, value in headers:
        if name.startswith(":"):
            if regular or name not in pseudo or name in seen:
                return True
            seen.add(name)
        else:
            regular = True
            if name in _CONNECTION_HEADERS or (name == "te" and value != "trailers"):
                return True
        if not name or name != name.lower():
            return True
    return False
