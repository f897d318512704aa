"""An agent restart or upgrade resets no connection and refuses none (issue 21, item 6).

`kill -TERM` an agent, as an operator (or a DaemonSet's maxSurge update) would: its successor
takes the pods' listening sockets over while it drains. Traffic runs through the mesh the whole
time: long-lived keep-alive connections (a request every 0.2 s) and a stream of new ones, from
the client on node1 to server-b on node2, both agents handed over in turn. Each mode: iptables,
eBPF, and the Kubernetes control plane.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.lab import VEIL, enrolled
from tests.support.traffic import TRAFFIC
from veil.lab import controlplane, store
from veil.lab.sniff import Sniffer


def exec_client(lab: str) -> list[str]:
    return [VEIL, "lab", "exec", "--name", lab, "-n", "mesh", "client", "--"]


def test_handing_over_both_agents_resets_no_connection_refuses_none_leaks_nothing(
    lab: str, pods: dict[str, dict[str, Any]]
) -> None:
    before = {n: enrolled(lab, n) for n in ("node1", "node2")}
    marker = f"handover-{secrets.token_hex(6)}"
    sniffer = Sniffer(f"/run/netns/veil-{lab}-underlay")
    seconds = 30

    def run() -> tuple[dict[str, Any], list[tuple[int, int]]]:
        app = subprocess.Popen(
            [
                *exec_client(lab),
                "python3",
                "-c",
                TRAFFIC,
                pods["server-b"]["ip"],
                str(seconds),
                marker,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert app.stdout is not None
            assert app.stdout.readline().strip() == "started"
            time.sleep(3)
            pids = [controlplane.hand_over_agent(lab, n) for n in ("node1", "node2")]
            out, _ = app.communicate(timeout=seconds + 30)
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
        return json.loads(out), pids

    result, pids = sniffer.during(run)
    assert [c["error"] for c in result["long"]] == [None] * 4, result
    assert all(c["requests"] > 50 for c in result["long"]), result
    assert result["new_errors"] == [], result
    assert result["new_ok"] > 50, result
    assert sniffer.plaintext(marker.encode()) == []
    # The new agents serve the same pods, handed over; the old ones drained and exited.
    assert {n: enrolled(lab, n) for n in ("node1", "node2")} == before
    for old, new in pids:
        deadline = time.monotonic() + 40
        while Path(f"/proc/{old}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{old}").exists(), f"agent {old} still running after its drain"
        assert Path(f"/proc/{new}").exists()
    for n in ("node1", "node2"):
        log = (store.lab_dir(lab) / "logs" / f"agent-{n}.log").read_text()
        assert f"handed over the listeners of {len(before[n])} pod(s)" in log
        assert "drained: every connection this agent held has ended" in log
