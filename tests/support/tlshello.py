"""Run inside a lab pod: `python tlshello.py <host:port> <sni>...` sends, on one connection
each, a real TLS ClientHello (Python's ssl) naming that server, and prints a JSON list:
`relayed` when bytes came back (the TCP echo answers), `refused` when the connection was
reset or closed without a byte."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys


def hello(sni: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):  # waits for the server: the hello is out
        tls.do_handshake()
    return out.read()


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    got = []
    for sni in sys.argv[2:]:
        try:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(hello(sni))
                got.append("relayed" if s.recv(65536) else "refused")
        except OSError:
            got.append("refused")
    print(json.dumps(got))


if __name__ == "__main__":
    main()
