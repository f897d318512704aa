"""Bulk data through a tunnel: decrypted into one buffer per read, sent as encrypted, intact."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import trio

from tests.support.hbone import hbone_pair
from veil.core.hbone import check_request
from veil.runtime.hbone.io import HboneIO


async def test_megabytes_arrive_intact_through_bulk_decryption_and_partial_sends(
    tmp_path: Path,
) -> None:
    """8 MiB over TCP with small socket buffers (the kernel takes part of most sends): every
    byte arrives in order, and the receiver decrypted its large reads in one piece each."""
    received = hashlib.sha256()
    done = trio.Event()
    total = 0

    def sink(ev: Any, io: HboneIO) -> None:
        req = check_request(ev)
        io.conn.respond(ev.stream_id, 200)
        io.queue_output()

        async def drain() -> None:
            nonlocal total
            stream = io.streams[ev.stream_id]
            while data := await stream.receive():
                received.update(data)
                total += len(data)
            done.set()

        io.spawn(req.stream_id, drain)

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    client_sock = socket.create_connection(lst.getsockname())
    server_sock, _ = lst.accept()
    lst.close()
    for s in (client_sock, server_sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    payload = os.urandom(8 * 1024 * 1024)
    async with trio.open_nursery() as nursery:
        client, server = await hbone_pair(tmp_path, nursery, sink, socks=(server_sock, client_sock))
        bulk = 0
        decrypt_into = server.tls._decrypt_into

        def counted(n: int) -> memoryview:
            nonlocal bulk
            bulk += 1
            return decrypt_into(n)

        server.tls._decrypt_into = counted  # type: ignore[method-assign]
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
