"""Sockets inside a pod's network namespace, from an agent that lives in the node's.

`setns(2)` switches the calling *thread*; the agent switches the event-loop thread into a pod
netns only for the synchronous `socket()` call and straight back (no await in between), so no
other task ever runs in the wrong netns. A socket keeps the netns it was created in: bind,
listen and connect on it act there. Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from veil.core.ports import AGENT_MARK

CLONE_NEWNET = 0x40000000
SO_MARK = 36
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_BIND_ADDRESS_NO_PORT = 24

_libc = ctypes.CDLL(None, use_errno=True)


Socket = socket.socket  # the name `socket` is also NetNs's method


class NetnsError(OSError):
    pass


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


_HOME: dict[int, int] = {}


def _home_fd() -> int:
    """The calling thread's own netns, opened once per thread (the agent never moves)."""
    import threading  # noqa: PLC0415

    tid = threading.get_ident()
    fd = _HOME.get(tid)
    if fd is None:
        fd = _HOME[tid] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


class NetNs:
    """An open handle on a network namespace (kept open so the netns cannot vanish under us).

    The sockets the agent connects with, one per proxied connection, are made a few at a
    time (`tcp_socket`): one pair of `setns` calls then serves `SPARE_SOCKETS` connections.
    """

    SPARE_SOCKETS = 8

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._spare: list[Socket] = []
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetnsError(e.errno, f"cannot open netns {self.path}: {e.strerror}") from None

    def close(self) -> None:
        for s in self._spare:
            s.close()
        self._spare.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the (synchronous) body in this netns; never await inside."""
        home = _home_fd()
        _setns(self.fd)
        try:
            yield
        finally:
            _setns(home)

    def socket(
        self,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        mark: bool = True,
        proto: int = 0,
    ) -> socket.socket:
        """A non-blocking socket in this netns, with the agent mark unless told otherwise."""
        with self.entered():
            s = socket.socket(family, type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, AGENT_MARK)
        return s

    def tcp_socket(self) -> Socket:
        """A non-blocking, marked TCP socket with TCP_NODELAY and IP_BIND_ADDRESS_NO_PORT
        (a port is chosen at connect(), by the 4-tuple, if it binds an address)."""
        if not self._spare:
            self._spare = self._make(self.SPARE_SOCKETS)
        return self._spare.pop()

    def _make(self, n: int) -> list[Socket]:
        made: list[Socket] = []
        try:
            with self.entered():
                for _ in range(n):
                    made.append(
                        socket.socket(
                            socket.AF_INET,
                            socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                        )
                    )
            for s in made:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, AGENT_MARK)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Without it, bind((ip, 0)) searches a free port itself: with thousands of
                # TIME_WAIT sockets that search dominated the cost of a spoofed connection.
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except BaseException:
            for s in made:
                s.close()
            raise
        return made


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (SO_ORIGINAL_DST, IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def make_transparent(sock: socket.socket) -> None:
    """Allow binding a non-local (the original client's) address: the app sees the real client."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


async def connect(
    ns: NetNs, address: tuple[str, int], timeout: float, source_ip: str | None = None
) -> socket.socket:
    """A marked TCP connection from inside `ns`; with `source_ip`, spoofing that source."""
    import trio  # noqa: PLC0415 - only the async path needs trio

    s = ns.tcp_socket()
    try:
        if source_ip is not None:
            make_transparent(s)
            s.bind((source_ip, 0))
        try:
            s.connect(address)
        except BlockingIOError:
            try:
                s.getpeername()  # a local connect is usually complete already
                return s
            except OSError:
                with trio.move_on_after(timeout):
                    await trio.lowlevel.wait_writable(s)
                    timeout = 0
                if timeout:  # a peer that drops packets: say so (an access log reads it)
                    raise TimeoutError(
                        errno.ETIMEDOUT,
                        f"connect to {address[0]}:{address[1]}: no answer within {timeout:g}s",
                    ) from None
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")
        return s
    except BaseException:
        s.close()
        raise


def listen(ns: NetNs, address: tuple[str, int], backlog: int = 1024) -> socket.socket:
    s = ns.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted ones
        s.bind(address)
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s
