"""An agent with worker processes (issue 24, item 2): `veil lab up --agent-workers 2`.

Both workers of a node accept from the pods' shared listeners; a worker that dies is
replaced while the other serves; an agent that stops takes its workers and their connections
with it (reset, never a clean end) and its pods are refused, never sent in plaintext; a
hand-over moves the listeners to the next agent's workers with no connection reset or
refused; a policy change cuts the open connections a worker holds.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.holders import DENY_CLIENT, HOLD_IDLE, HOLD_OPEN, apply, ended, holding
from tests.support.lab import MESH, VEIL, leftovers, new_lab_name, veil
from tests.support.traffic import TRAFFIC
from veil.lab import controlplane
from veil.lab.sniff import Sniffer


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def wlab(request: pytest.FixtureRequest) -> Iterator[str]:
    name = new_lab_name()
    try:
        veil(
            "lab", "up", "-f", MESH, "--name", name, "--agent-workers", "2",
            "--capture", request.param, timeout=300,
        )  # fmt: skip
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []


@pytest.fixture(scope="module")
def server_ip(wlab: str) -> str:
    st = json.loads(veil("lab", "status", "--name", wlab, "-o", "json").stdout)
    return str(next(p["ip"] for p in st["pods"] if p["name"] == "server-b"))


def workers(lab: str, node: str) -> dict[str, Any]:
    code, body = controlplane.agent_get(f"veil-{lab}-{node}", "/config_dump")
    assert code == 200, body
    doc: dict[str, Any] = json.loads(body)["workers"]
    return doc


def exec_client(lab: str) -> list[str]:
    return [VEIL, "lab", "exec", "--name", lab, "-n", "mesh", "client", "--"]


CONNECT_MANY = """
import socket, sys
ok = 0
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 8080), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        ok += got.startswith(b"HTTP/1.1 200")
print(ok)
"""


def connect_many(lab: str, ip: str, n: int) -> int:
    out = subprocess.run(
        [*exec_client(lab), "python3", "-c", CONNECT_MANY, ip, str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return int(out.strip())


def test_both_workers_accept_from_the_shared_listeners(wlab: str, server_ip: str) -> None:
    marker = f"workers-{secrets.token_hex(6)}"
    sniffer = Sniffer(f"/run/netns/veil-{wlab}-underlay")
    # The client's node: each captured connection is accepted by one of its workers (on the
    # server's node they arrive as streams of the pooled tunnels).
    before = {p["index"]: p["connections"] for p in workers(wlab, "node1")["processes"]}

    def run() -> int:
        ok = connect_many(wlab, server_ip, 60)
        veil("lab", "exec", "--name", wlab, "-n", "mesh", "client", "--", "curl", "-s",
             f"http://{server_ip}:8080/{marker}")  # fmt: skip
        return ok

    assert sniffer.during(run) == 60
    assert sniffer.plaintext(marker.encode()) == []
    doc = workers(wlab, "node1")
    assert doc["count"] == 2 and len(doc["processes"]) == 2
    served = {p["index"]: p["connections"] - before[p["index"]] for p in doc["processes"]}
    assert sum(served.values()) >= 60, served  # each inbound connection, in one worker
    assert all(n > 0 for n in served.values()), served  # both took their share
    # The workers' metrics are the node's: one scrape of the agent counts them all.
    code, body = controlplane.agent_get(f"veil-{wlab}-node2", "/metrics", 15020)
    assert code == 200 and "veil_agent_workers 2.0" in body
    assert body.count("# TYPE istio_tcp_connections_opened_total counter") == 1


def test_a_worker_that_dies_is_replaced_while_the_other_serves(wlab: str, server_ip: str) -> None:
    doc = workers(wlab, "node2")
    victim = doc["processes"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert connect_many(wlab, server_ip, 20) == 20  # meanwhile: the other worker
    deadline = time.monotonic() + 20
    while True:
        doc2 = workers(wlab, "node2")
        pids = [p["pid"] for p in doc2["processes"]]
        if len(pids) == 2 and victim not in pids:
            break
        assert time.monotonic() < deadline, doc2
        time.sleep(0.2)
    assert doc2["restarts"] == doc["restarts"] + 1
    assert connect_many(wlab, server_ip, 20) == 20
    log = Path(f"/run/veil/lab/{wlab}/logs/agent-node2.log").read_text()
    assert f"worker 0 exited with status -{signal.SIGKILL}" in log


def test_a_policy_change_cuts_what_the_workers_hold(
    wlab: str, server_ip: str, tmp_path: Path
) -> None:
    try:
        with holding(wlab, HOLD_IDLE, server_ip) as holder:
            time.sleep(0.5)
            apply(wlab, tmp_path, DENY_CLIENT)
            assert ended(holder) == "reset"
    finally:
        veil("lab", "delete", "--name", wlab, "authorizationpolicy", "server-policy", "-n", "mesh")
        time.sleep(1.0)
    assert connect_many(wlab, server_ip, 5) == 5


def test_a_hand_over_moves_the_listeners_to_the_next_agents_workers(
    wlab: str, server_ip: str
) -> None:
    marker = f"handover-{secrets.token_hex(6)}"
    sniffer = Sniffer(f"/run/netns/veil-{wlab}-underlay")
    seconds = 20

    def run() -> tuple[dict[str, Any], tuple[int, int]]:
        app = subprocess.Popen(
            [*exec_client(wlab), "python3", "-c", TRAFFIC, server_ip, str(seconds), marker],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert app.stdout is not None and app.stdout.readline().strip() == "started"
            time.sleep(3)
            pids = controlplane.hand_over_agent(wlab, "node2")
            out, _ = app.communicate(timeout=seconds + 30)
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
        return json.loads(out), pids

    result, (old, new) = sniffer.during(run)
    assert [c["error"] for c in result["long"]] == [None] * 4, result
    assert result["new_errors"] == [], result
    assert result["new_ok"] > 20, result
    assert sniffer.plaintext(marker.encode()) == []
    doc = workers(wlab, "node2")
    assert len(doc["processes"]) == 2
    assert all(p["pid"] != new for p in doc["processes"])  # workers, not the agent itself
    deadline = time.monotonic() + 40
    while Path(f"/proc/{old}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{old}").exists(), "the old agent did not exit after its drain"


def test_a_stopped_agent_takes_its_workers_and_connections_with_it(
    wlab: str, server_ip: str
) -> None:
    pids = [p["pid"] for p in workers(wlab, "node2")["processes"]]
    try:
        with holding(wlab, HOLD_OPEN, server_ip) as holder:
            controlplane.stop_agent(wlab, "node2", signal=9)  # a crash: the workers see it
            assert ended(holder) == "reset"  # never a clean end
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in pids):
            assert time.monotonic() < deadline, "workers outlived their agent"
            time.sleep(0.1)
        # Fail closed: the pod is refused while no agent runs, never reached in plaintext.
        with pytest.raises(subprocess.CalledProcessError):
            connect_many(wlab, server_ip, 1)
    finally:
        veil("lab", "agent", "--name", wlab, "start", "node2")
    assert connect_many(wlab, server_ip, 5) == 5
