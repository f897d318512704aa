"""Bulk data through a tunnel: decrypted into one buffer per read, sent as encrypted, intact."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import trio

from tests.support.hbone import hbone_pair, loopback_pair, sink


async def test_megabytes_arrive_intact_through_bulk_decryption_and_partial_sends(
    tmp_path: Path,
) -> None:
    """8 MiB over TCP with small socket buffers (the kernel takes part of most sends): every
    byte arrives in order, and the receiver decrypted its large reads in one piece each."""
    received = hashlib.sha256()
    total = 0
    done = trio.Event()

    def got(data: bytes | memoryview) -> None:
        nonlocal total
        received.update(data)
        total += len(data)

    server_sock, client_sock = loopback_pair()
    for s in (client_sock, server_sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    payload = os.urandom(8 * 1024 * 1024)
    async with trio.open_nursery() as nursery:
        client, server = await hbone_pair(
            tmp_path, nursery, sink(got, done), socks=(server_sock, client_sock)
        )
        bulk = 0  # decryptions that returned more than one record's plaintext in one piece
        decrypt = server.tls._decrypt

        def counted(n: int) -> memoryview:
            nonlocal bulk
            data = decrypt(n)
            bulk += len(data) > 16 * 1024
            return data

        server.tls._decrypt = counted  # type: ignore[method-assign]
        stream = await client.open_stream("10.0.0.1:80", [])
        with trio.fail_after(30):
            for i in range(0, len(payload), 256 * 1024):
                await stream.send(payload[i : i + 256 * 1024])
            await stream.send_eof()
            await done.wait()
        nursery.cancel_scope.cancel()
    assert total == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()
    assert bulk > 0
