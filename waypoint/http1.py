"""HTTP/1.1 details of proxying, pure: protocol detection, hop-by-hop headers, trace context.

The framing itself is h11's (sans-IO); the waypoint's I/O feeds it HBONE stream bytes.
"""

from __future__ import annotations

import random
import re
import secrets
from collections.abc import Iterable

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


# RFC 9110 5.6.2: a method is a token; RFC 9112 3: request-line = method SP target SP version.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/1\.[01]\r?")
MAX_REQUEST_LINE = 8192  # longer than this without a line end: not HTTP/1.x we will parse


def websocket_upgrade(headers: Iterable[tuple[str, str]]) -> bool:
    """An HTTP/1.1 request asking to switch to WebSocket (RFC 6455 4.1): `Upgrade: websocket`
    and `upgrade` among the Connection options. Other upgrades (h2c, ...) are not passed on:
    their hop-by-hop headers are dropped and the request goes as plain HTTP/1.1."""
    upgrade = connection = False
    for n, v in headers:
        name = n.lower()
        if name == "upgrade":
            upgrade = upgrade or any(t.strip().lower() == "websocket" for t in v.split(","))
        elif name == "connection":
            connection = connection or any(t.strip().lower() == "upgrade" for t in v.split(","))
    return upgrade and connection


UPGRADE_HEADERS = [("connection", "Upgrade"), ("upgrade", "websocket")]


def detect(buf: bytes) -> str | None:
    """`http1`, `h2` (prior knowledge) or `tcp` once the first bytes a client sent make it
    certain; None while they are still the start of an HTTP/1.x request line or of the HTTP/2
    preface (read more, up to a limit and a deadline, then call it `tcp`).

    A method is any RFC 9110 token (`post`, `PROPFIND`, `PURGE` ...), leading empty lines are
    skipped (RFC 9112 2.2), and a request line split across reads is waited for: what is
    judged as TCP must never be a request that policies would judge as HTTP.
    """
    if buf[:24] == H2_PREFACE[: len(buf[:24])]:
        return "h2" if len(buf) >= len(H2_PREFACE) else None
    data = skip_empty_lines(buf)
    end = data.find(b"\n")
    if end < 0:
        if not data:
            return None if len(buf) < MAX_REQUEST_LINE else "tcp"
        if len(data) >= MAX_REQUEST_LINE or not _could_be_request_line(data):
            return "tcp"
        return None
    return "http1" if _REQUEST_LINE.fullmatch(data[:end]) else "tcp"


def skip_empty_lines(buf: bytes) -> bytes:
    """The bytes after any empty lines (CRLF or LF) that precede a request line."""
    return buf.lstrip(b"\r\n")


def _could_be_request_line(prefix: bytes) -> bool:
    """Whether `prefix` (no line end yet) can still grow into a request line."""
    method, sp, rest = prefix.partition(b" ")
    if not method or any(c not in _TCHAR for c in method):
        return False
    if not sp:
        return True
    target, sp, version = rest.partition(b" ")
    if any(c < 0x21 or c > 0x7E for c in target):
        return False
    return not sp or any(v.startswith(version) for v in (b"HTTP/1.1\r", b"HTTP/1.0\r"))


_BARE_CR_OR_LF = re.compile(rb"(?<!\r)\n|\r(?!\n)")
_FOLDED = re.compile(rb"\r\n[ \t]")
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*)", re.I)
MAX_HEAD = 64 * 1024  # h11 refuses larger heads (16 KiB), so this much always holds one


def framing_doubt(raw: bytes) -> str | None:
    """Why a request head's framing is ambiguous, or None.

    h11 accepts some heads that proxies and backends read differently, the root of request
    smuggling: Content-Length beside Transfer-Encoding (h11 forwards both), a repeated
    Content-Length (merged when equal), bare LF or CR line ends, folded header lines, and a
    Transfer-Encoding other than exactly `chunked`. `raw` is the head as received, from its
    request line on (anything after the blank line is ignored).
    """
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 2]
    if _BARE_CR_OR_LF.search(head):
        return "a line ends in a bare LF or CR"
    if _FOLDED.search(head):
        return "a folded header line (obs-fold)"
    lengths = encodings = 0
    for name, value in _FRAMING.findall(head):
        if name.lower() == b"content-length":
            lengths += 1
        else:
            encodings += 1
            if value.strip().lower() != b"chunked":
                return f"Transfer-Encoding {value.strip()[:32]!r} is not just chunked"
    if lengths > 1:
        return "more than one Content-Length"
    if encodings > 1:
        return "more than one Transfer-Encoding"
    if lengths and encodings:
        return "Content-Length together with Transfer-Encoding"
    return None


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
