"""The server name (SNI) of a TLS ClientHello, sans-IO: for `connection.sni` in policies that a
waypoint judges on a stream it does not terminate. Reads only what RFC 8446 4.1.2 and RFC 6066
3 lay out; anything else is "not a ClientHello" (no name), never an exception.
"""

from __future__ import annotations

from enum import Enum

MAX_HELLO = 16 * 1024  # one TLS record's worth (RFC 8446 5.1: 2^14); past it, no name


class Hello(Enum):
    NEED_MORE = "need more bytes"
    NOT_TLS = "not a TLS ClientHello"


def _u16(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 2], "big")


def server_name(data: bytes) -> str | Hello | None:
    """The host_name of the SNI extension (lower case, no trailing dot); None when the
    ClientHello has none; NEED_MORE while the first record is incomplete; NOT_TLS otherwise.
    Only a ClientHello within the first record is read (as Envoy's tls_inspector does)."""
    if not data:
        return Hello.NEED_MORE
    if data[0] != 0x16:  # handshake record
        return Hello.NOT_TLS
    if len(data) >= 2 and data[1] != 0x03:  # TLS 1.x record versions are 3.x
        return Hello.NOT_TLS
    if len(data) < 5:
        return Hello.NEED_MORE
    length = _u16(data, 3)
    if length > MAX_HELLO or length < 4:
        return Hello.NOT_TLS
    if len(data) < 5 + length:
        return Hello.NEED_MORE
    rec = data[5 : 5 + length]
    if rec[0] != 0x01:  # ClientHello
        return Hello.NOT_TLS
    body_len = int.from_bytes(rec[1:4], "big")
    body = rec[4 : 4 + body_len]
    if len(body) < body_len:
        return Hello.NOT_TLS  # spread over several records: not read
    try:
        return _sni_of(body)
    except (IndexError, ValueError):
        return Hello.NOT_TLS


def _sni_of(body: bytes) -> str | None:
    i = 2 + 32  # legacy_version, random
    i += 1 + body[i]  # legacy_session_id
    i += 2 + _u16(body, i)  # cipher_suites
    i += 1 + body[i]  # legacy_compression_methods
    if i == len(body):
        return None  # no extensions
    end = i + 2 + _u16(body, i)
    if end > len(body):
        raise ValueError("extensions past the ClientHello")
    i += 2
    while i + 4 <= end:
        ext_type, ext_len = _u16(body, i), _u16(body, i + 2)
        data = body[i + 4 : i + 4 + ext_len]
        if len(data) != ext_len:
            raise ValueError("extension past the end")
        if ext_type == 0:  # server_name
            j = 2
            list_end = 2 + _u16(data, 0)
            while j + 3 <= list_end:
                kind, n = data[j], _u16(data, j + 1)
                name = data[j + 3 : j + 3 + n]
                if kind == 0:  # host_name
                    host = name.decode("ascii").lower().rstrip(".")
                    if not host or any(c in host for c in "\x00 /"):
                        raise ValueError("not a host name")
                    return host
                j += 3 + n
            return None
        i += 4 + ext_len
    return None
