"""The agent hand-over protocol on a real Unix socket, with real listening sockets passed."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from veil.agent import handover
from veil.agent.enrollment import PodLocks


def listening() -> list[socket.socket]:
    socks = []
    for _ in range(3):
        s = socket.create_server(("127.0.0.1", 0))
        socks.append(s)
    return socks


ENTRY = {"namespace": "mesh", "name": "a", "uid": "u1", "netns": "/run/netns/x", "ip": "10.0.0.1"}


async def start_server(
    nursery: trio.Nursery, path: Path, pods: dict[str, Any], released: list[str]
) -> handover.HandoverServer:
    async def release() -> None:
        released.append("released")

    server = handover.HandoverServer(path, PodLocks().every, lambda: pods, release)
    await nursery.start(server.serve)
    return server


async def running_agent(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[handover.HandoverServer, list[socket.socket], list[str], handover.Predecessor]:
    """A running agent with one pod's listeners, and a successor that asked for them."""
    socks = listening()
    released: list[str] = []
    server = await start_server(nursery, tmp_path / "h.sock", {"mesh/a": (ENTRY, socks)}, released)
    pred = await handover.take_over(tmp_path / "h.sock")
    assert pred is not None
    return server, socks, released, pred


async def test_a_successor_receives_the_same_listening_sockets(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        server, socks, released, pred = await running_agent(nursery, tmp_path)
        ((entry, got),) = pred.pods.values()
        assert entry == ENTRY
        assert [s.getsockname() for s in got] == [s.getsockname() for s in socks]
        # The same socket: a connection queued on the old one is accepted from the new one.
        client = socket.create_connection(socks[0].getsockname())
        conn, _ = got[0].accept()
        conn.close()
        client.close()
        assert released == [] and not server.handed_over.is_set()
        await pred.confirm()
        assert released == ["released"] and server.handed_over.is_set()
        # A second successor is told no: there is nothing left to hand over here.
        with pytest.raises(handover.HandoverError, match="already handed over"):
            await handover.take_over(tmp_path / "h.sock")
        nursery.cancel_scope.cancel()
    for s in [*socks, *got]:
        s.close()
    assert not (tmp_path / "h.sock").exists()


async def test_a_successor_that_goes_away_before_taken_changes_nothing(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        server, socks, released, pred = await running_agent(nursery, tmp_path)
        pred.abandon()
        await trio.sleep(0.1)
        assert released == [] and not server.handed_over.is_set()
        # and the next one may still take over
        again = await handover.take_over(tmp_path / "h.sock")
        assert again is not None and len(again.pods) == 1
        again.abandon()
        nursery.cancel_scope.cancel()
    for s in socks:
        s.close()


async def test_no_running_agent_means_no_predecessor(tmp_path: Path) -> None:
    assert await handover.take_over(tmp_path / "none.sock") is None
    stale = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # a dead agent's socket file: connection refused
    assert await handover.take_over(tmp_path / "stale.sock") is None


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b'{"no": "op"}', b"[1]"],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(handover.HandoverError):
        handover.decode(data)


@pytest.mark.parametrize(
    "entry", [None, {}, {"namespace": "a", "name": "b", "netns": 3, "ip": "x"}, "text"]
)
def test_bad_pod_entries_are_refused(entry: Any) -> None:
    with pytest.raises(handover.HandoverError):
        handover.entry_of({"op": "pod", "entry": entry})
