"""Run inside a lab pod: a WebSocket client (RFC 6455) from the standard library only.
`python wsclient.py <host[:port]> <path> <message>...` opens one connection, checks the
handshake (101 and Sec-WebSocket-Accept), sends each message as a masked text frame (a
binary one for `hex:<hex digits>`) and prints one JSON object: the 101's headers and each
message that came back (binary ones as `hex:...` again)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import sys

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(text: str) -> bytes:
    binary = text.startswith("hex:")
    payload, mask = (bytes.fromhex(text[4:]) if binary else text.encode()), os.urandom(4)
    head = bytes([0x82 if binary else 0x81])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_exact(s: socket.socket, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-frame")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def read_frame(s: socket.socket, buf: bytearray) -> str:
    b0, b1 = read_exact(s, 2, buf)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", read_exact(s, 2, buf))
    elif n == 127:
        (n,) = struct.unpack("!Q", read_exact(s, 8, buf))
    if b1 & 0x80:
        raise ValueError("a server frame must not be masked")
    opcode = b0 & 0x0F
    if opcode not in (0x1, 0x2):
        raise ValueError(f"not a data frame: opcode {opcode}")
    payload = read_exact(s, n, buf)
    return payload.decode() if opcode == 0x1 else "hex:" + payload.hex()


def main() -> None:
    address, path, messages = sys.argv[1], sys.argv[2], sys.argv[3:]
    host, _, port = address.partition(":")
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection((host, int(port or 80)), timeout=10)
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    out: dict[str, object] = {"status": status, "headers": headers, "echoed": []}
    if status == 101:
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        out["accept_ok"] = headers.get("sec-websocket-accept") == want
        pending = bytearray(rest)
        for m in messages:
            s.sendall(frame(m))
            out["echoed"].append(read_frame(s, pending))  # type: ignore[attr-defined]
    s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
