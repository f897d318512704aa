"""Agent hand-over: a new agent on the node takes the listening sockets of every enrolled pod
from the one running, so an upgrade or restart resets no connection and refuses none.

On a Unix SOCK_SEQPACKET socket in the agent's data dir (one message per record, JSON, with
the sockets as SCM_RIGHTS):

    successor   -> {"op": "take"}
    predecessor -> {"op": "pod", "entry": {...Enrolled...}}   + the pod's 3 listening sockets
                   ... one per enrolled pod ...
    predecessor -> {"op": "end"}
    successor   -> {"op": "taken"}      once it serves every pod (and its own CNI socket)
    predecessor -> {"op": "released"}   it stopped accepting and released the node ports

The sockets are the same kernel objects in both processes: until "taken" both agents accept
on them, then the predecessor stops, so a connection waiting in an accept queue is never lost
(unlike SO_REUSEPORT, where a closing socket's queue is reset). Capture rules and programs
point at the ports, not at a process, and stay as they are. The predecessor then finishes the
connections it holds for its drain period: its inbound tunnels get a two-step GOAWAY (their
clients open new streams to the successor), its outbound connections run to their end.

If the successor goes away before "taken", the predecessor carries on as if nothing happened.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("veil.handover")
MAX_MESSAGE = 64 * 1024
MAX_FDS = 3
STEP_TIMEOUT = 60.0  # seconds either side waits for the other's next message


class HandoverError(Exception):
    pass


# -- messages (pure) ------------------------------------------------------------------------


def encode(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}).encode()


def decode(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise HandoverError(f"not a hand-over message: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("op"), str):
        raise HandoverError("not a hand-over message: no op")
    return doc


def entry_of(doc: dict[str, Any]) -> dict[str, Any]:
    """A pod's registry entry (enrollment.Enrolled as a dict)."""
    raw = doc.get("entry")
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(k), str) for k in ("namespace", "name", "netns", "ip")
    ):
        raise HandoverError(f"bad pod entry: {raw!r}")
    return raw


# -- socket I/O -----------------------------------------------------------------------------


async def send(sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None) -> None:
    anc = []
    if fds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    with trio.fail_after(STEP_TIMEOUT):
        await sock.sendmsg([data], anc)


async def receive(
    sock: trio.socket.SocketType, timeout: float = STEP_TIMEOUT
) -> tuple[dict[str, Any], list[socket.socket]]:
    """The next message and the sockets that came with it (closed by us on a bad message)."""
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    with trio.fail_after(timeout):
        data, anc, flags, _ = await sock.recvmsg(MAX_MESSAGE, space)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    socks = [socket.socket(fileno=fd) for fd in fds]
    if not data:
        for s in socks:
            s.close()
        raise HandoverError("the other agent closed the hand-over connection")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for s in socks:
            s.close()
        raise HandoverError("hand-over message truncated")
    try:
        return decode(data), socks
    except HandoverError:
        for s in socks:
            s.close()
        raise


# -- the successor ----------------------------------------------------------------------------


@dataclass
class Predecessor:
    """A running agent that handed us its pods' listeners and waits for "taken"."""

    sock: trio.socket.SocketType
    pods: dict[str, tuple[dict[str, Any], list[socket.socket]]] = field(default_factory=dict)

    async def confirm(self) -> None:
        """We serve every pod: the predecessor stops accepting and releases the node ports."""
        try:
            await send(self.sock, encode("taken"))
            doc, _ = await receive(self.sock)
            if doc["op"] != "released":
                raise HandoverError(f"expected released, got {doc['op']}")
        finally:
            self.sock.close()

    def abandon(self) -> None:
        for _, socks in self.pods.values():
            for s in socks:
                s.close()
        self.sock.close()


async def take_over(path: Path) -> Predecessor | None:
    """Ask the agent running on this node (if any) for its pods' listeners."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None  # no agent runs (first start, or it is gone): resume from the registry
    pred = Predecessor(sock)
    try:
        await send(sock, encode("take"))
        while True:
            doc, socks = await receive(sock)
            if doc["op"] == "end":
                break
            if doc["op"] == "refused":
                raise HandoverError(f"the running agent refused: {doc.get('reason')}")
            if doc["op"] != "pod":
                raise HandoverError(f"unexpected {doc['op']!r}")
            entry = entry_of(doc)
            pred.pods[f"{entry['namespace']}/{entry['name']}"] = (entry, socks)
    except (HandoverError, OSError, trio.TooSlowError) as e:
        pred.abandon()
        raise HandoverError(f"taking over from the running agent failed: {e}") from None
    log.info("the running agent handed over the listeners of %d pod(s)", len(pred.pods))
    return pred


# -- the predecessor --------------------------------------------------------------------------

Listeners = Callable[[], dict[str, tuple[dict[str, Any], list[socket.socket]]]]


@dataclass
class HandoverServer:
    """The running agent's side. `listeners()`: every enrolled pod and its listening sockets,
    taken while no enrollment change is in progress (`exclusive()`, which waits for those
    and holds new ones off); `release()` is called once the successor confirmed: stop
    accepting everywhere, free the node ports, start draining."""

    path: Path
    exclusive: Callable[[], AbstractAsyncContextManager[None]]
    listeners: Listeners
    release: Callable[[], Awaitable[None]]
    handed_over: trio.Event = field(default_factory=trio.Event)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        await listener.bind(str(tmp))
        tmp.chmod(0o600)
        listener.listen(4)
        tmp.replace(self.path)  # atomically ours: a successor after us replaces it the same way
        ino = self.path.stat().st_ino
        try:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                with conn:
                    try:
                        await self._one(conn)
                    except (HandoverError, OSError, trio.TooSlowError) as e:
                        log.warning("hand-over to a new agent failed (serving on): %s", e)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == ino:  # not yet replaced by a successor's
                    self.path.unlink()

    async def _one(self, conn: trio.socket.SocketType) -> None:
        doc, socks = await receive(conn)
        for s in socks:
            s.close()
        if doc["op"] != "take":
            raise HandoverError(f"expected take, got {doc['op']!r}")
        if self.handed_over.is_set():
            await send(conn, encode("refused", reason="already handed over"))
            return
        async with self.exclusive():  # no pod enrolled or released while the successor takes over
            pods = self.listeners()
            for entry, listeners in pods.values():
                await send(conn, encode("pod", entry=entry), [s.fileno() for s in listeners])
            await send(conn, encode("end"))
            log.info("handing over %d pod(s) to a new agent", len(pods))
            doc, socks = await receive(conn)
            for s in socks:
                s.close()
            if doc["op"] != "taken":
                raise HandoverError(f"expected taken, got {doc['op']!r}")
            self.handed_over.set()
            await self.release()
        await send(conn, encode("released"))
        log.info("handed over to the new agent: draining the connections in hand")
