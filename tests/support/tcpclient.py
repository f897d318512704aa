"""Run inside a lab pod: `python tcpclient.py <host:port> <count> <text>` opens `count` TCP
connections one after another, sends the text on each and prints a JSON list of the first
answer of each (or the error): `veil echo --tcp-port` answers `<pod> <text>`, read until
the text is back."""

from __future__ import annotations

import json
import socket
import sys


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    count, text = int(sys.argv[2]), sys.argv[3].encode()
    out = []
    for _ in range(count):
        try:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(text)
                got = b""
                while not got.endswith(text) and (chunk := s.recv(65536)):
                    got += chunk
                out.append(got.decode(errors="replace"))
        except OSError as e:
            out.append(f"error: {e}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
