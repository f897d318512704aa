"""HTTP/1.1 proxying details of the waypoint (pure)."""

from __future__ import annotations

import pytest

from waypoint import http1


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (b"GET / HTTP/1.1\r\n", "http1"),
        (b"POST /x HTTP/1.1\r\n", "http1"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2"),
        (b"PRI * HTTP/2", "h2"),  # a first read may be short
        (b"\x16\x03\x01\x02\x00", "tcp"),  # TLS inside the tunnel
        (b"SSH-2.0-OpenSSH", "tcp"),
        (b"", "tcp"),
    ],
)
def test_protocol_detection(first, kind):
    assert http1.detect(first) == kind


def test_hop_by_hop_headers_are_not_forwarded():
    headers = [
        ("Host", "catalog"),
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("X-Private", "1"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Accept", "*/*"),
    ]
    assert http1.end_to_end(headers) == [("Host", "catalog"), ("Accept", "*/*")]
    assert http1.is_chunked(headers)


def test_trace_context_keeps_the_trace_and_makes_a_new_span():
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    child = http1.child_traceparent([("traceparent", parent)])
    assert child.startswith("00-0af7651916cd43dd8448eb211c80319c-") and child.endswith("-01")
    assert child != parent
    fresh = http1.child_traceparent([("traceparent", "garbage")])
    assert not fresh.startswith("00-0af7") and len(fresh) == 55
