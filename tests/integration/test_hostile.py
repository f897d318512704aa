"""Hostile input against a real agent (issue 17): each attack, then proof that the same agent
process still serves. Runs on tests/integration/mesh with iptables capture (these attacks
reach the agent's listeners directly, whatever the capture mode)."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.support.hbone import raw_tunnel
from tests.support.lab import MESH, curl_json, new_lab_name, veil
from tests.support.pki import mesh_client_context
from veil.agent.capture.netns import NetNs
from veil.core.hbone import HboneConnection, ResponseReceived
from veil.core.spiffe import SpiffeId
from veil.lab import controlplane

TD = "cluster.local"


@pytest.fixture(scope="module")
def hlab() -> Iterator[str]:
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", MESH, "--name", name)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)


@pytest.fixture(scope="module")
def hpods(hlab: str) -> dict[str, dict[str, Any]]:
    st = json.loads(veil("lab", "status", "--name", hlab, "-o", "json").stdout)
    return {p["name"]: p for p in st["pods"]}


def agent_pid(lab: str, node: str) -> int:
    """The agent's own pid (not its supervisor's), asserting it never had to be restarted."""
    p = controlplane.agent_process(lab, node)
    assert p["restarts"] == 0, f"agent {node} was restarted: see its log"
    return int(p["pid"])


def still_serving(lab: str, pods: dict[str, dict[str, Any]]) -> None:
    answer = curl_json(lab, "client", f"http://{pods['server-b']['ip']}:8080/", "mesh")
    assert answer["pod"] == "server-b"


def test_a_connect_to_a_unicode_digit_port_gets_400_and_the_agent_serves_on(hlab, hpods, tmp_path):
    """Issue 17.3: one frame from any mesh certificate holder used to kill the agent."""
    pid = agent_pid(hlab, "node2")
    ctx = mesh_client_context(hlab, "node2", SpiffeId(TD, "plain", "default"), tmp_path)
    target = hpods["server-b"]["ip"]
    statuses: list[int] = []

    async def attack() -> None:
        tls = await raw_tunnel(f"/run/netns/veil-{hlab}-plain_legacy", target, ctx)
        conn = HboneConnection(client=True)
        conn.connect(f"{target}:\u00b2", [])
        conn.connect(f"{target}:8080", [("forwarded", 'for="10.0.0.1:\u00b2"')])
        tls.write(conn.data_to_send())
        await tls.flush()
        with trio.move_on_after(5):
            while len(statuses) < 2:
                data = await tls.recv()
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, ResponseReceived):
                        statuses.append(ev.status)
        tls.close()

    trio.run(attack)
    assert statuses[0] == 400  # the second: 200, its bad `forwarded` ignored
    still_serving(hlab, hpods)
    assert agent_pid(hlab, "node2") == pid


def test_connections_reset_at_the_agents_http_ports_do_not_stop_it(hlab, hpods):
    """Issue 17.1: a burst reset right after the handshake killed every agent/http server."""
    pid = agent_pid(hlab, "node1")
    ns = NetNs(f"/run/netns/veil-{hlab}-node1")
    try:
        for port in (15020, 15021, 15000):
            for _ in range(300):
                s = ns.socket(mark=False)
                s.setblocking(True)
                s.connect(("127.0.0.1", port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
    finally:
        ns.close()
    code, _ = controlplane.agent_get(f"veil-{hlab}-node1", "/metrics", 15020)
    assert code == 200
    still_serving(hlab, hpods)
    assert agent_pid(hlab, "node1") == pid


def test_idle_handshakes_from_one_peer_are_capped_and_others_get_through(hlab, hpods):
    """Issue 17.5: idle connections to 15008 each held a 256 KiB buffer, without limit."""
    target = hpods["server-b"]["ip"]
    ns = NetNs(f"/run/netns/veil-{hlab}-plain_legacy")
    held: list[socket.socket] = []
    try:
        for _ in range(100):
            s = ns.socket(mark=False)
            s.setblocking(True)
            s.connect((target, 15008))
            held.append(s)
        closed = 0
        for s in held:
            s.settimeout(2 if closed == 0 else 0.2)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        assert closed >= 100 - 64  # past 64 pending handshakes from one peer: closed at once
        still_serving(hlab, hpods)  # another peer's handshake goes through meanwhile
    finally:
        for s in held:
            s.close()
        ns.close()


def test_a_crashed_agent_is_restarted_and_lab_status_says_so(hlab, hpods):
    """Issue 17.4: the lab supervises its daemons as the kubelet would (restartPolicy Always)."""
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    before = controlplane.agent_process(hlab, "node2")
    os.kill(before["pid"], 9)  # the agent itself, as a crash would end it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = controlplane.agent_process(hlab, "node2")
        if now["restarts"] == 1 and now["pid"] != before["pid"]:
            code, _ = controlplane.agent_get(f"veil-{hlab}-node2", "/healthz/ready", 15021)
            if code == 200:
                break
        time.sleep(0.2)
    else:
        raise AssertionError("the agent did not come back ready within 20 s")
    still_serving(hlab, hpods)  # pods resumed from the registry, no pod restarted
    st = json.loads(veil("lab", "status", "--name", hlab, "-o", "json").stdout)
    agent = next(p for p in st["processes"] if p["name"] == "agent node2")
    assert (agent["restarts"], agent["phase"]) == (1, "Running")
    assert "RESTARTS" in veil("lab", "status", "--name", hlab).stdout
