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
from collections.abc import Iterable, Mapping, Sequence
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


class HboneConnection:
    """One HBONE connection's HTTP/2 state (client or server role)."""

    def __init__(self, client: bool) -> None:
        self.client = client
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client,
                header_encoding=None,
                validate_inbound_headers=True,
                normalize_inbound_headers=False,
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

    # -- client side ---------------------------------------------------------------------

    def connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Open a CONNECT stream; returns its id."""
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id, [(":method", "CONNECT"), (":authority", authority), *headers]
        )
        return stream_id

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

    # -- both ----------------------------------------------------------------------------

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes may be sent on the stream now (stream and connection windows)."""
        try:
            return int(self.h2.local_flow_control_window(stream_id))
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return -1

    def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        """Frame up to the window; the caller checks `send_window()` first."""
        size = self.h2.max_outbound_frame_size
        for i in range(0, len(data), size):
            self.h2.send_data(stream_id, data[i : i + size])

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

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The application consumed `length` flow-controlled bytes: reopen the windows."""
        if length:
            self.h2.acknowledge_received_data(length, stream_id)

    def close(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()

    def ping(self, opaque: bytes = b"veilping") -> None:
        self.h2.ping(opaque)

    def receive_data(self, data: bytes) -> Iterable[h2.events.Event]:
        try:
            return self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            raise HboneProtocolError(str(e)) from e

    def data_to_send(self) -> bytes:
        out: bytes = self.h2.data_to_send()
        return out
