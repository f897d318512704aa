"""The I/O around `veil.agent.workerwire`: one end of the socketpair between an agent's
control process and a worker, messages and listening sockets both ways."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections import deque
from collections.abc import Sequence

import trio

from veil.agent.workerwire import Decoder, WireError, encode

MAX_FDS = 16  # per read; a Serve carries 3
READ = 1 << 16


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self._decoder = Decoder()
        self._ready: deque[object] = deque()
        self._sending = trio.Lock()  # one frame at a time: tasks never interleave bytes

    async def send(self, msg: object, fds: Sequence[int] = ()) -> None:
        await self.send_frame(encode(msg), fds)

    async def send_frame(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        """One encoded message; `fds` ride with its first byte (the caller still owns them)."""
        view = memoryview(frame)
        async with self._sending:
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                view = view[await self.sock.sendmsg([view], rights) :]
            while view:
                view = view[await self.sock.send(view) :]

    async def receive(self) -> object | None:
        """The next message; None once the other end closed."""
        while not self._ready:
            data, ancillary, flags, _ = await self.sock.recvmsg(
                READ, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            fds = received_fds(ancillary)
            if flags & socket.MSG_CTRUNC:
                close_all(fds)
                raise WireError("descriptors were cut off in transit")
            if not data:
                close_all(fds + self._decoder.leftover_fds())
                return None
            self._decoder.feed(data, fds)
            self._ready.extend(self._decoder.messages())
        return self._ready.popleft()

    def close(self) -> None:
        self.sock.close()


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
