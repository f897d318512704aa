"""The accept loop every Veil listener shares (pod ports, the waypoint's 15008): accepts all
that is ready, and runs each connection behind the barrier, so one failure closes only it."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from veil.runtime import guard

log = logging.getLogger("veil.listener")

Handler = Callable[[socket.socket, Any], Awaitable[None]]  # (connection, peer address)


async def serve(
    listener: socket.socket, handler: Handler, conns: trio.Nursery | None = None
) -> None:
    """Accept every connection that is ready and run its handler; runs until cancelled, then
    closes the listener. Connections run in `conns` when given (so cancelling the accept loop,
    as a hand-over does, leaves them running), else in a nursery of their own."""
    listener.setblocking(False)
    with contextlib.suppress(OSError):  # accepted sockets inherit it (Linux): no call per accept
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with contextlib.AsyncExitStack() as stack:
            nursery = (
                conns if conns is not None else await stack.enter_async_context(trio.open_nursery())
            )
            while True:
                await trio.lowlevel.wait_readable(listener)
                while True:
                    try:
                        conn, peer = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:  # EMFILE and the like: back off, keep serving
                        log.warning("accept on %s failed: %s", listener.getsockname(), e)
                        await trio.sleep(0.1)
                        break
                    conn.setblocking(False)
                    nursery.start_soon(_guarded_conn, handler, conn, peer)
    finally:
        listener.close()


async def _guarded_conn(handler: Handler, conn: socket.socket, peer: Any) -> None:
    """One connection's handler behind the barrier: a failure closes that connection only."""
    try:
        await handler(conn, peer)
    except Exception:
        guard.caught(getattr(handler, "__name__", "connection"))
        conn.close()
