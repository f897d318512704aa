"""The proxies' accept loop."""

from __future__ import annotations

import socket

import trio
import trio.testing

from tests.support.waiting import until
from veil.runtime.listener import serve


async def test_accepted_connections_are_non_blocking_without_nagle() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    seen: list[tuple[int, float | None]] = []

    async def handler(conn: socket.socket, peer: object) -> None:
        seen.append((conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), conn.gettimeout()))
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener, handler)
        await trio.testing.wait_all_tasks_blocked()  # serving: the listener's options are set
        client = socket.create_connection(listener.getsockname())
        await until(lambda: bool(seen), 2)
        client.close()
        nursery.cancel_scope.cancel()
    assert seen[0][0] != 0 and seen[0][1] == 0.0
