"""A tunnel whose peer goes silent ends within TUNNEL_TIMEOUT: two real netns, real TCP.

The peer's node "vanishes" (iptables drops everything in its netns): without the tunnel's
user timeout the stream would hang until TCP gives up, ~15 minutes later.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.hbone import hbone_pair, on_request
from veil.agent.capture.netns import NetNs, connect, listen
from veil.runtime.hbone import io as hbone_io
from veil.runtime.hbone.io import HboneError

pytestmark = pytest.mark.integration


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """netns a (10.99.7.1) and b (10.99.7.2) joined by a veth pair; removed afterwards."""
    tag = secrets.token_hex(3)
    a, b = f"veil-t{tag}a", f"veil-t{tag}b"
    try:
        for ns in (a, b):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", a, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", b)
        for ns, dev, addr in ((a, "v0", "10.99.7.1/30"), (b, "v1", "10.99.7.2/30")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        yield f"/run/netns/{a}", f"/run/netns/{b}"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


async def test_a_silent_peer_ends_the_tunnel(
    two_hosts: tuple[str, str],
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hbone_io, "TUNNEL_TIMEOUT", 2.0)
    ns_a, ns_b = NetNs(two_hosts[0]), NetNs(two_hosts[1])
    listener = listen(ns_b, ("10.99.7.2", 15008))
    try:
        client_sock = await connect(ns_a, ("10.99.7.2", 15008), 5)
        server_sock, _ = listener.accept()
    finally:
        listener.close()
    client, _server = await hbone_pair(
        tmp_path, nursery, on_request, socks=(server_sock, client_sock)
    )

    stream = await client.open_stream("10.99.7.2:9080", [])
    await stream.send(b"ping")
    with trio.fail_after(2):
        assert await stream.receive() == b"ping"

    for chain in ("INPUT", "OUTPUT"):  # host b goes silent
        subprocess.run(
            ["ip", "netns", "exec", Path(two_hosts[1]).name, "iptables", "-A", chain, "-j", "DROP"],
            check=True,
        )
    await stream.send(b"into the void")
    with trio.fail_after(15), pytest.raises(HboneError):
        await stream.receive()
    assert client.closed
    ns_a.close()
    ns_b.close()
