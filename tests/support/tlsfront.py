"""Run inside a lab pod: `python tlsfront.py <port> <host:port> <cert> <key> <root>` listens
on 127.0.0.1:<port> and carries each connection to <host:port> over TLS 1.3 with that client
certificate (ALPN h2, the server's chain checked against <root>): a TLS client in front of
a tool that has no client certificates (h2spec). Prints `ready` once listening."""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def main() -> None:
    port, target, cert, key, root = sys.argv[1:6]
    host, _, tport = target.rpartition(":")
    ctx = ssl.create_default_context(cafile=root)
    ctx.check_hostname = False  # mesh certificates name SPIFFE IDs, not hosts
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    server = socket.create_server(("127.0.0.1", int(port)))
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = ctx.wrap_socket(socket.create_connection((host, int(tport)), timeout=10))
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
