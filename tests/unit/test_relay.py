"""TCP relays end the way their sides did: a cancelled relay (agent stopping) resets."""

from __future__ import annotations

import socket

import pytest
import trio

from veil.agent.proxy.copy import relay_tcp


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


async def test_a_cancelled_tcp_relay_resets_both_sides() -> None:
    client_app, a = tcp_pair()
    b, server_app = tcp_pair()
    with trio.move_on_after(0.2):
        await relay_tcp(a, b)  # both apps idle: runs until cancelled
    for app in (client_app, server_app):
        app.settimeout(2)
        with pytest.raises(ConnectionResetError):
            app.recv(1)
        app.close()


async def test_a_finished_tcp_relay_ends_cleanly() -> None:
    client_app, a = tcp_pair()
    b, server_app = tcp_pair()
    client_app.sendall(b"ping")
    client_app.shutdown(socket.SHUT_WR)
    server_app.settimeout(2)
    client_app.settimeout(2)

    async def server() -> None:
        got = b""
        while chunk := await trio.to_thread.run_sync(server_app.recv, 10):
            got += chunk
        assert got == b"ping"
        server_app.sendall(b"pong")
        server_app.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        moved = await relay_tcp(a, b)
    assert client_app.recv(10) == b"pong" and client_app.recv(10) == b""
    assert (moved.up, moved.down) == (4, 4)
    client_app.close()
