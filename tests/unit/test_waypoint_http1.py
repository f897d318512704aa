"""HTTP/1.1 proxying details of the waypoint (pure)."""

from __future__ import annotations

import pytest

from veil.waypoint import http1


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (b"GET / HTTP/1.1\r\n", "http1"),
        (b"POST /x HTTP/1.1\r\n", "http1"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2"),
        (b"PRI * HTTP/2", None),  # a first read may be short: read on
        (b"\x16\x03\x01\x02\x00", "tcp"),  # TLS inside the tunnel
        (b"SSH-2.0-OpenSSH_9.2\r\n", "tcp"),
        (b"", None),
        # Issue 17.9: what used to be judged as TCP and relayed with no policy at all.
        (b"G", None),  # split request: wait for the rest of the line
        (b"GET /adm", None),
        (b"GET /admin HTTP/1.", None),
        (b"post /cart HTTP/1.1\r\n", "http1"),  # a method is any token
        (b"PROPFIND / HTTP/1.1\r\n", "http1"),
        (b"PURGE /x HTTP/1.0\n", "http1"),
        (b"\r\nGET / HTTP/1.1\r\n", "http1"),  # leading empty line (RFC 9112 2.2)
        (b"\r\n\r\n", None),
        (b"GET / HTTP/2.0\r\n", "tcp"),  # not HTTP/1.x
        (b"GET /a b HTTP/1.1\r\n", "tcp"),
        (b"GE\x00T", "tcp"),
        (b"GET " + b"a" * 9000, "tcp"),  # no line end within the limit
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
