"""HTTP/1.1 details of proxying, pure: protocol detection, hop-by-hop headers, trace context.

The framing itself is h11's (sans-IO); the waypoint's I/O feeds it HBONE stream bytes.
"""

from __future__ import annotations

import random
import re
import secrets
from collections.abc import Iterable

HTTP1_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9110 7.6.1: meaningful for one hop only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ids = random.Random(secrets.randbits(64))


def detect(first: bytes) -> str:
    """`http1`, `h2` (prior knowledge) or `tcp`, from the first bytes a client sent."""
    if first.startswith(H2_PREFACE[: len(first)]) and first:
        return "h2"
    token = first.split(b" ", 1)[0]
    if token in HTTP1_METHODS or (token == b"CONNECT" and b" HTTP/1." in first):
        return "http1"
    return "tcp"


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and those the Connection header names."""
    pairs = list(headers)
    named = {
        t.strip().lower()
        for n, v in pairs
        if n.lower() == "connection"
        for t in v.split(",")
        if t.strip()
    }
    return [(n, v) for n, v in pairs if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def is_chunked(headers: Iterable[tuple[str, str]]) -> bool:
    return any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)


def child_traceparent(headers: Iterable[tuple[str, str]]) -> str:
    """W3C trace context for the upstream request: the caller's trace with a new span id, or
    a new trace when the caller sent none (or a malformed one)."""
    for n, v in headers:
        if n.lower() == "traceparent" and (m := TRACEPARENT.match(v.strip().lower())):
            return f"00-{m.group(1)}-{_ids.getrandbits(64):016x}-{m.group(3)}"
    return f"00-{_ids.getrandbits(128):032x}-{_ids.getrandbits(64):016x}-01"
