"""HBONE's HTTP/2 layer, sans-IO: against itself, against the h2 library as an independent peer,
and against hand-made frames that break the protocol."""

from __future__ import annotations

import random
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest

from veil.core.hbone import (
    CONTINUATION,
    DATA,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ConnectionTerminated,
    Data,
    ErrorCode,
    HboneConnection,
    HboneProtocolError,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowOpened,
    decode_plain,
    encode_headers,
    frame_header,
)


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame in `data` (after a client preface)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE) :]
    out = []
    while data:
        length = int.from_bytes(data[:3], "big")
        ftype, flags = data[3], data[4]
        sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        out.append((ftype, flags, sid, data[9 : 9 + length]))
        data = data[9 + length :]
    return out


def pair() -> tuple[HboneConnection, HboneConnection]:
    client, server = HboneConnection(client=True), HboneConnection(client=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the SETTINGS ACK
    return client, server


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, sid) + payload


def test_a_stream_lives_and_ends_on_both_sides():
    client, server = pair()
    sid = client.connect("10.0.0.2:80", [("forwarded", 'for="10.0.0.1:4000"')])
    [req] = server.receive_data(client.data_to_send())
    assert isinstance(req, RequestReceived) and req.stream_id == sid
    assert dict(req.headers)[":authority"] == "10.0.0.2:80"
    assert dict(req.headers)["forwarded"] == 'for="10.0.0.1:4000"'
    server.respond(sid, 200)
    [resp] = client.receive_data(server.data_to_send())
    assert isinstance(resp, ResponseReceived) and resp.status == 200
    client._out += client.data_header(sid, 5) + b"hello"
    client.end_stream(sid)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [Data, StreamEnded]
    assert bytes(events[0].data) == b"hello"  # type: ignore[union-attr]
    assert client.open_streams == 1 and server.open_streams == 1  # half-closed
    server.end_stream(sid)
    assert client.receive_data(server.data_to_send()) == [StreamEnded(sid)]
    assert client.open_streams == 0 and server.open_streams == 0
    assert client.send_window(sid) == -1  # ended: no more DATA


def test_refusals_and_their_status():
    client, server = pair()
    sid = client.connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    server.respond(sid, 401, end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert events == [ResponseReceived(sid, 401, [(":status", "401")]), StreamEnded(sid)]
    client.forget(sid)  # the client never ended its side: it resets the stream
    assert (RST_STREAM, 0, sid, struct.pack("!I", 0)) in frames(client.data_to_send())
    assert client.open_streams == 0


def test_forgetting_an_open_stream_cancels_it():
    client, server = pair()
    sid = client.connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    client.forget(sid)
    assert server.receive_data(client.data_to_send()) == [StreamReset(sid, ErrorCode.CANCEL)]
    assert server.open_streams == 0


def test_large_header_blocks_travel_in_continuation_frames():
    client, server = HboneConnection(client=True), HboneConnection(client=False)
    server.receive_data(client.data_to_send())
    big = "x" * 40000  # above 16 KiB, the frame size until the peer's SETTINGS say more
    sid = client.connect("10.0.0.2:80", [("baggage", big)])
    out = client.data_to_send()
    assert [f[0] for f in frames(out)] == [HEADERS, CONTINUATION, CONTINUATION]
    [req] = server.receive_data(out)
    assert isinstance(req, RequestReceived) and dict(req.headers)["baggage"] == big
    assert req.stream_id == sid


def test_an_interrupted_header_block_is_a_connection_error():
    _, server = pair()
    block = encode_headers([(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    bad = frame(HEADERS, 0, 1, block[:3]) + frame(PING, 0, 0, b"12345678")
    with pytest.raises(HboneProtocolError, match="PROTOCOL_ERROR"):
        server.receive_data(bad)
    assert frames(server.data_to_send())[-1][0] == GOAWAY


def test_settings_and_ping_are_answered():
    _, server = pair()
    events = server.receive_data(
        frame(SETTINGS, 0, 0, struct.pack("!HI", 0x4, 1 << 20)) + frame(PING, 0, 0, b"abcdefgh")
    )
    assert events == [WindowOpened(0)]  # the initial window changed
    out = frames(server.data_to_send())
    assert (SETTINGS, 1, 0, b"") in out
    assert (PING, 1, 0, b"abcdefgh") in out


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "PROTOCOL_ERROR"),  # not HTTP/2
        (PREFACE + frame(PING, 0, 0, b"12345678"), "PROTOCOL_ERROR"),  # no SETTINGS first
        (PREFACE + frame(SETTINGS, 0, 0, b"\x00\x04"), "FRAME_SIZE_ERROR"),
        (PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 0, b"x"), "PROTOCOL_ERROR"),
        (PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 7, b"x"), "PROTOCOL_ERROR"),  # idle
        # RFC 9113 6.9: an increment of 0 is a PROTOCOL_ERROR (h2spec http2/6.9)
        (PREFACE + frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), "PROTOCOL"),
        # RFC 9113 5.1: an idle stream takes HEADERS and PRIORITY only (h2spec http2/5.1)
        (PREFACE + frame(SETTINGS, 0, 0) + frame(RST_STREAM, 0, 5, b"\0\0\0\x08"), "PROTOCOL"),
        (PREFACE + frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 5, b"\0\0\0\x01"), "PROTOCOL"),
        (PREFACE + frame(SETTINGS, 0, 0) + frame(CONTINUATION, 4, 1, b""), "PROTOCOL_ERROR"),
        (PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, 4, 2, b"\x82"), "PROTOCOL_ERROR"),
        (PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, 4, 1, b"\xff\xff"), "COMPRESSION"),
        (PREFACE + frame(SETTINGS, 0, 0, struct.pack("!HI", 0x5, 100)), "PROTOCOL_ERROR"),
        (PREFACE + frame_header(2 * 1024 * 1024, DATA, 0, 1), "FRAME_SIZE_ERROR"),
    ],
)
def test_protocol_violations_end_the_connection_with_goaway(data, code):
    server = HboneConnection(client=False)
    server.data_to_send()
    with pytest.raises(HboneProtocolError, match=code):
        server.receive_data(data)
    assert frames(server.data_to_send())[-1][0] == GOAWAY


def test_a_peer_overrunning_the_window_is_a_flow_control_error():
    client, server = pair()
    sid = client.connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    too_much = b"".join(frame(DATA, 0, sid, b"x" * (1 << 20)) for _ in range(5))
    with pytest.raises(HboneProtocolError, match="FLOW_CONTROL_ERROR"):
        server.receive_data(too_much)  # 5 MiB > the 4 MiB stream window


def test_malformed_requests_are_reset_not_delivered():
    _, server = pair()
    block = encode_headers([(":method", "CONNECT"), (":authority", "a:1"), ("Forwarded", "x")])
    assert server.receive_data(frame(HEADERS, 0x4, 1, block)) == []
    assert (RST_STREAM, 0, 1, struct.pack("!I", ErrorCode.PROTOCOL_ERROR)) in frames(
        server.data_to_send()
    )
    block = encode_headers([(":method", "CONNECT"), ("te", "x"), (":authority", "a:1")])
    assert server.receive_data(frame(HEADERS, 0x4, 3, block)) == []


def test_peer_limits_and_goaway_stop_new_streams():
    client, server = HboneConnection(client=True), HboneConnection(client=False)
    server.receive_data(client.data_to_send())
    client.receive_data(frame(SETTINGS, 0, 0, struct.pack("!HI", 0x3, 2)))
    client.connect("10.0.0.2:80")
    assert client.can_open_stream()
    client.connect("10.0.0.2:80")
    assert not client.can_open_stream()  # the peer allows two at a time
    events = client.receive_data(frame(GOAWAY, 0, 0, struct.pack("!II", 3, 0)))
    assert events == [ConnectionTerminated(0, 3)]
    client._next_sid = 2**31 + 1
    assert not client.can_open_stream()


def test_stream_ids_run_out():
    client, _ = pair()
    client._next_sid = 2**31 - 1
    assert client.can_open_stream()
    client.connect("10.0.0.2:80")
    assert not client.can_open_stream()


# -- the h2 library as an independent peer (Huffman coding, dynamic table, its own framing) --


def h2_peer(client: bool) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client))
    c.initiate_connection()
    return c


def test_an_h2_client_tunnels_through_our_server():
    peer, server = h2_peer(client=True), HboneConnection(client=False)
    server.receive_data(peer.data_to_send())
    peer.receive_data(server.data_to_send())
    for _ in range(3):  # the h2 encoder indexes headers: later requests use its dynamic table
        sid = peer.get_next_available_stream_id()
        peer.send_headers(
            sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), ("baggage", "a=b")]
        )
        peer.send_data(sid, b"ping", end_stream=True)
        events = server.receive_data(peer.data_to_send())
        assert isinstance(events[0], RequestReceived)
        assert dict(events[0].headers) == {
            ":method": "CONNECT",
            ":authority": "10.0.0.2:80",
            "baggage": "a=b",
        }
        assert bytes(events[1].data) == b"ping"  # type: ignore[union-attr]
        assert events[2] == StreamEnded(sid)
        server.acknowledge(sid, 4)
        server.respond(sid, 200)
        server._out += server.data_header(sid, 4) + b"pong"
        server.end_stream(sid)
        got = peer.receive_data(server.data_to_send())
        resp = next(e for e in got if isinstance(e, h2.events.ResponseReceived))
        assert dict(resp.headers)[b":status"] == b"200"
        data = next(e for e in got if isinstance(e, h2.events.DataReceived))
        assert data.data == b"pong"
        assert any(isinstance(e, h2.events.StreamEnded) for e in got)
        server.forget(sid)
        peer.acknowledge_received_data(4, sid)
    assert server.open_streams == 0


def test_our_client_tunnels_through_an_h2_server():
    peer, client = h2_peer(client=False), HboneConnection(client=True)
    peer.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384}
    )
    peer.receive_data(client.data_to_send())
    client.receive_data(peer.data_to_send())
    sid = client.connect(
        "10.0.0.2:80", [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")]
    )
    got = peer.receive_data(client.data_to_send())
    req = next(e for e in got if isinstance(e, h2.events.RequestReceived))
    assert dict(req.headers)[b":authority"] == b"10.0.0.2:80"
    peer.send_headers(sid, [(":status", "200"), ("server", "h2")])
    peer.send_data(sid, b"x" * 20000)  # two DATA frames at the peer's 16 KiB
    peer.reset_stream(sid, 8)
    events = client.receive_data(peer.data_to_send())
    assert isinstance(events[0], ResponseReceived) and events[0].status == 200
    assert b"".join(bytes(e.data) for e in events if isinstance(e, Data)) == b"x" * 20000
    assert events[-1] == StreamReset(sid, 8)
    assert client.open_streams == 0


# -- HPACK: the fast path agrees with the hpack library ------------------------------------


def test_plain_blocks_round_trip_and_match_hpack():
    headers = [
        (":method", "CONNECT"),
        (":authority", "10.244.1.7:8080"),
        ("forwarded", 'for="10.244.0.5:41000"'),
        ("baggage", "k8s.namespace.name=shop," * 20),  # a length above 127: multi-byte
        ("x-custom-header-name", ""),
    ]
    block = encode_headers(headers)
    assert decode_plain(block) == headers
    decoded = hpack.Decoder().decode(block, raw=True)
    assert [(k.decode(), v.decode()) for k, v in decoded] == headers
    assert decode_plain(b"\x88") == [(":status", "200")]


def test_blocks_using_huffman_or_the_dynamic_table_go_to_hpack():
    encoder = hpack.Encoder()
    assert decode_plain(encoder.encode([(":authority", "example.com")])) is None  # indexed
    assert decode_plain(encoder.encode([(":authority", "example.com")])) is None  # dynamic
    assert decode_plain(b"\x3f\xe1\x1f") is None  # a table size update


def test_the_fast_path_never_disagrees_with_hpack_on_random_input():
    rng = random.Random(1)
    samples = [encode_headers([("a", "b"), (":path", "/x")])]
    samples += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 24))) for _ in range(3000)]
    for block in samples:
        fast = decode_plain(block)
        if fast is None:
            continue
        full = hpack.Decoder().decode(block, raw=True)
        assert fast == [(k.decode("latin-1"), v.decode("latin-1")) for k, v in full], block


def test_a_held_answer_leaves_in_front_of_its_streams_first_frame_only():
    client, server = pair()
    a = client.connect("10.0.0.2:80")
    b = client.connect("10.0.0.2:81")
    server.receive_data(client.data_to_send())
    server.respond(a, 200, hold=True)
    server.respond(b, 200)
    server.acknowledge(a, 1)  # other output of the connection goes without it
    assert [(f[0], f[2]) for f in frames(server.data_to_send())] == [(HEADERS, b)]
    server._out += server.data_header(a, 2) + b"hi"
    server.end_stream(a)
    assert [(f[0], f[1], f[2]) for f in frames(server.data_to_send())] == [
        (HEADERS, 4, a),
        (DATA, 0, a),
        (DATA, 1, a),
    ]
    server.respond(b, 200)  # answering twice is a no-op
    assert server.data_to_send() == b""


def test_a_reset_stream_still_carries_its_held_answer_first():
    client, server = pair()
    sid = client.connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    server.respond(sid, 200, hold=True)
    server.reset(sid)  # the app accepted, then reset the connection
    assert client.receive_data(server.data_to_send()) == [
        ResponseReceived(sid, 200, [(":status", "200")]),
        StreamReset(sid, ErrorCode.CANCEL),
    ]


# -- floods and duplicates (issue 17, items 6 and 8) ---------------------------------------------


def test_a_repeated_authority_is_malformed():
    _, server = pair()
    block = encode_headers(
        [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), (":authority", "10.0.0.3:80")]
    )
    assert server.receive_data(frame(HEADERS, 0x4, 1, block)) == []
    assert (RST_STREAM, 0, 1, struct.pack("!I", ErrorCode.PROTOCOL_ERROR)) in frames(
        server.data_to_send()
    )


def calm(conn: HboneConnection, data: bytes) -> None:
    with pytest.raises(HboneProtocolError, match="ENHANCE_YOUR_CALM"):
        conn.receive_data(data)
    (goaway,) = [f for f in frames(conn.data_to_send()) if f[0] == GOAWAY]
    assert struct.unpack("!II", goaway[3])[1] == ErrorCode.ENHANCE_YOUR_CALM


def test_pings_whose_answers_are_never_read_end_the_connection():
    _, server = pair()
    ping = frame(PING, 0, 0, b"12345678")
    server.receive_data(ping * 990)  # answers queued, none sent: the peer reads nothing
    calm(server, ping * 20)


def test_pings_answered_and_read_go_on_forever():
    _, server = pair()
    ping = frame(PING, 0, 0, b"12345678")
    for _ in range(5):
        server.receive_data(ping * 900)
        server.data_to_send()
        server.output_drained()  # what the I/O layer says once the socket took it all


def test_settings_floods_count_too():
    _, server = pair()
    calm(server, frame(SETTINGS, 0, 0) * 1001)


def test_priority_floods_end_the_connection():
    _, server = pair()
    priority = frame(0x2, 0, 1, b"\x00\x00\x00\x00\x10")
    server.receive_data(priority * 100)  # up to 100 per stream opened, plus 100
    calm(server, priority)


def test_zero_length_continuation_floods_end_the_connection():
    _, server = pair()
    head = frame(HEADERS, 0, 1, encode_headers([(":method", "CONNECT")]))
    calm(server, head + frame(CONTINUATION, 0, 1) * 17)


def test_continuations_per_header_block_are_bounded():
    _, server = pair()
    head = frame(HEADERS, 0, 1, encode_headers([(":method", "CONNECT")]))
    calm(server, head + frame(CONTINUATION, 0, 1, b"\x00") * 33)


def test_empty_data_floods_end_the_connection():
    client, server = pair()
    sid = client.connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    server.receive_data(frame(DATA, 0, sid) * 16)
    calm(server, frame(DATA, 0, sid))


def test_a_server_takes_at_most_100_streams_on_a_tunnel():
    """Issue 17.7: 20 tunnels of 1000 streams took an agent to its descriptor limit."""
    from veil.core.hbone import MAX_INBOUND_STREAMS  # noqa: PLC0415

    client, server = HboneConnection(client=True), HboneConnection(client=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    opened = []
    for _ in range(MAX_INBOUND_STREAMS + 1):
        client.connect("a:1")  # past the peer's limit: the pool would not, a hostile peer may
        opened += [
            e for e in server.receive_data(client.data_to_send()) if isinstance(e, RequestReceived)
        ]
    assert len(opened) == MAX_INBOUND_STREAMS == 100
    refused = [f for f in frames(server.data_to_send()) if f[0] == RST_STREAM]
    assert refused == [
        (RST_STREAM, 0, 2 * MAX_INBOUND_STREAMS + 1, struct.pack("!I", ErrorCode.REFUSED_STREAM))
    ]


def test_stream_errors_h2spec_found():
    """RFC 9113 6.9 (an increment of 0 on a stream) and 5.3.1 (a stream that depends on
    itself) are stream errors: RST_STREAM PROTOCOL_ERROR, the connection lives on."""
    server = HboneConnection(client=False)
    server.data_to_send()
    server.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    server.data_to_send()
    connect = encode_headers([(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    server.receive_data(frame(HEADERS, 4, 1, connect) + frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\0"))
    resets = [f for f in frames(server.data_to_send()) if f[0] == RST_STREAM]
    assert resets and resets[-1][2] == 1 and resets[-1][3] == b"\0\0\0\x01"
    server.receive_data(frame(HEADERS, 4, 3, connect) + frame(PRIORITY, 0, 3, b"\0\0\0\x03\x10"))
    resets = [f for f in frames(server.data_to_send()) if f[0] == RST_STREAM]
    assert resets and resets[-1][2] == 3 and resets[-1][3] == b"\0\0\0\x01"


@pytest.mark.parametrize(
    "pseudo",
    [
        [(":authority", "10.0.0.2:80")],  # no :method
        [(":method", "GET"), (":scheme", "http"), (":authority", "a")],  # no :path
        [(":method", "GET"), (":path", "/"), (":authority", "a")],  # no :scheme
        [(":method", "GET"), (":scheme", "http"), (":path", ""), (":authority", "a")],
        [(":method", "CONNECT"), (":scheme", "http"), (":authority", "a:1")],  # RFC 9113 8.5
    ],
)
def test_malformed_request_heads_are_stream_errors(pseudo):
    """RFC 9113 8.3.1 (h2spec http2/8.1.2.3): a reset stream, not a 400 answer."""
    server = HboneConnection(client=False)
    server.data_to_send()
    server.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    server.data_to_send()
    events = server.receive_data(frame(HEADERS, 5, 1, encode_headers(pseudo)))
    assert not events
    resets = [f for f in frames(server.data_to_send()) if f[0] == RST_STREAM]
    assert resets == [(RST_STREAM, 0, 1, b"\0\0\0\x01")]
