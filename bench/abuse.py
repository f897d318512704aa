"""Abuse under load: the agent's limits tested together by a mixed attack while normal
traffic runs, and what the normal traffic saw before, during and after.

    sudo .venv/bin/python bench/abuse.py [--seconds 15] [--waypoint]

Lab: tests/integration/mesh (two nodes, iptables capture). Normal traffic: inside `client`
(node1), one new connection per request to server-b (node2) through both agents, back to back,
each request's latency and outcome logged. Three phases of `--seconds` each: before, during
the attack, after. The attack, all at once against node2's agent and server-b:

- handshakes: 1000 TCP connections to 15008 from `plain/legacy` that never say a word;
- slow clients on 15006: 500 plaintext connections from `plain/legacy` to server-b:8080,
  sending a request one byte a second (the app gets each as it comes);
- control frames: 4 mesh tunnels (a valid certificate of `plain/default`) sending PINGs as
  fast as they can, never reading the answers;
- streams: 16 tunnels x 100 streams (the per-peer caps) opened to server-b:8080 and held.

`--waypoint`: the waypoint suite's lab (tests/integration/waypoint) instead; normal traffic
from web/client to the catalog Service (through node1's agent and the waypoint, new
connection per request), and the attack 500 slow HTTP/1.1 clients in web/client itself, so
in the mesh and through the waypoint's HTTP parsing, a byte a second; the waypoint's RSS and
CPU.

Per phase: requests, errors, p50 and p99 latency of the normal traffic; node2's agent RSS
(peak) and CPU; what each attack got (connections closed by the agent, tunnels ended). After
the attack stops: how long until the normal traffic's p50 (over 1 s) is back within 1.5x of
the before phase's. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.hbone import raw_tunnel  # noqa: E402
from tests.support.pki import mesh_client_context  # noqa: E402

from bench.proc import VEIL, cpu_s, rss_kb, veil  # noqa: E402
from veil.agent.capture.netns import NetNs  # noqa: E402
from veil.core.hbone import HboneConnection  # noqa: E402
from veil.core.spiffe import SpiffeId  # noqa: E402
from veil.lab import controlplane  # noqa: E402

MESH = str(ROOT / "tests" / "integration" / "mesh")
WAYPOINT = str(ROOT / "tests" / "integration" / "waypoint")
WAYPOINT_PORT = 9080  # the catalog Service, bound to the waypoint
LAB = "abuse"

LOAD = """
import socket, sys, time
target, seconds, port = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    start = time.monotonic()
    ok = 0
    try:
        s = socket.create_connection((target, port), timeout=2)
        s.settimeout(2)
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        ok = int(data.startswith(b"HTTP/1.1 200"))
        s.close()
    except OSError:
        pass
    print(f"{start - t0:.3f} {time.monotonic() - start:.5f} {ok}", flush=True)
    if not ok:
        time.sleep(0.05)
"""


class Attack:
    """Counters of what the attackers got back."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


def netns_socket(ns_path: str) -> socket.socket:
    ns = NetNs(ns_path)
    try:
        s = ns.socket(mark=False)
    finally:
        ns.close()
    s.setblocking(False)
    return s


async def tcp(ns_path: str, target: str, port: int) -> trio.SocketStream:
    s = netns_socket(ns_path)
    sock = trio.socket.from_stdlib_socket(s)
    await sock.connect((target, port))
    return trio.SocketStream(sock)


async def silent_handshakes(ns: str, target: str, n: int, a: Attack) -> None:
    async def one() -> None:
        try:
            stream = await tcp(ns, target, 15008)
        except OSError:
            a.count("handshake: connect refused")
            return
        async with stream:
            try:
                if await stream.receive_some(1) == b"":
                    a.count("handshake: closed by the agent")
            except trio.BrokenResourceError:
                a.count("handshake: reset by the agent")

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


async def slow_clients(ns: str, target: str, n: int, a: Attack, port: int = 8080) -> None:
    request = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"

    async def one() -> None:
        try:
            stream = await tcp(ns, target, port)
        except OSError:
            a.count("slow: connect refused")
            return
        async with stream:
            try:
                for b in request:
                    await stream.send_all(bytes([b]))
                    await trio.sleep(1)
                a.count("slow: request completed")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                a.count("slow: cut by the agent")

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


async def ping_flood(ns: str, target: str, ctx: Any, a: Attack) -> None:
    while True:
        try:
            tls = await raw_tunnel(ns, target, ctx)
        except OSError:
            a.count("pings: tunnel refused")
            await trio.sleep(0.1)
            continue
        conn = HboneConnection(client=True)
        try:
            while True:
                for _ in range(100):
                    conn.ping()
                tls.write(conn.data_to_send())
                await tls.flush()
                await trio.sleep(0)
        except OSError:
            a.count("pings: tunnel ended by the agent")
        finally:
            tls.close()


async def stream_hog(ns: str, target: str, ctx: Any, streams: int, a: Attack) -> None:
    try:
        tls = await raw_tunnel(ns, target, ctx)
    except OSError:
        a.count("streams: tunnel refused")
        return
    conn = HboneConnection(client=True)
    try:
        for _ in range(streams):
            conn.connect(f"{target}:8080", [])
        tls.write(conn.data_to_send())
        await tls.flush()
        while data := await tls.recv():
            conn.receive_data(data)
            tls.write(conn.data_to_send())
            await tls.flush()
        a.count("streams: tunnel ended by the agent")
    except OSError:
        a.count("streams: tunnel reset by the agent")
    finally:
        tls.close()


async def waypoint_attack(lab: str, target: str, ctx: Any, stop: trio.Event, a: Attack) -> None:
    """500 slow HTTP/1.1 clients from web/client (in the mesh: through node1's agent and
    the waypoint's HTTP parsing) to the catalog Service."""
    client = f"/run/netns/veil-{lab}-web_client"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_clients, client, target, 500, a, WAYPOINT_PORT)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def attack(lab: str, target: str, ctx: Any, stop: trio.Event, a: Attack) -> None:
    legacy = f"/run/netns/veil-{lab}-plain_legacy"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_handshakes, legacy, target, 1000, a)
        nursery.start_soon(slow_clients, legacy, target, 500, a)
        for _ in range(4):
            nursery.start_soon(ping_flood, legacy, target, ctx, a)
        for _ in range(16):
            nursery.start_soon(stream_hog, legacy, target, ctx, 100, a)
        await stop.wait()
        nursery.cancel_scope.cancel()


def phase_stats(rows: list[tuple[float, float, int]], lo: float, hi: float) -> dict[str, Any]:
    mine = [(lat, ok) for t, lat, ok in rows if lo <= t < hi]
    good = sorted(lat for lat, ok in mine if ok)
    return {
        "requests": len(mine),
        "errors": sum(1 for _, ok in mine if not ok),
        "p50": statistics.median(good) * 1000 if good else float("nan"),
        "p99": good[int(len(good) * 0.99)] * 1000 if good else float("nan"),
    }


def recovery(rows: list[tuple[float, float, int]], end_of_attack: float, p50: float) -> float:
    """Seconds after the attack until a 1 s window's p50 is within 1.5x of `p50`."""
    t = end_of_attack
    while t < rows[-1][0]:
        window = sorted(lat for s, lat, ok in rows if t <= s < t + 1 and ok)
        if window and statistics.median(window) * 1000 <= 1.5 * p50:
            return t - end_of_attack
        t += 0.25
    return float("nan")


SETTLE = 35.0


def sample(
    pid: int, every: float, out: list[tuple[float, int, float]], done: Callable[[], bool]
) -> None:
    while not done():
        out.append((time.monotonic(), rss_kb(pid), cpu_s(pid)))
        time.sleep(every)


def waypoint_pid() -> int:
    """The waypoint process (under its supervisor) of this bench's lab."""
    out = subprocess.run(
        ["pgrep", "-f", "-n", "veil waypoint --gateway waypoint --namespace web"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[0])


def run(seconds: float, waypoint: bool) -> None:
    veil("lab", "down", "--name", LAB, check=False)
    veil("lab", "up", "-f", WAYPOINT if waypoint else MESH, "--name", LAB)
    try:
        st = json.loads(veil("lab", "status", "--name", LAB, "-o", "json"))
        if waypoint:
            target = next(s["clusterIP"] for s in st["services"] if s["name"] == "catalog")
            pid, port, ns, who = waypoint_pid(), WAYPOINT_PORT, "web", "the waypoint"
        else:
            target = next(p["ip"] for p in st["pods"] if p["name"] == "server-b")
            pid = int(controlplane.agent_process(LAB, "node2")["pid"])
            port, ns, who = 8080, "mesh", "node2 agent"
        ctx = None
        if not waypoint:
            with tempfile.TemporaryDirectory() as d:
                ctx = mesh_client_context(
                    LAB, "node2", SpiffeId("cluster.local", "plain", "default"), Path(d)
                )
        log = Path(tempfile.mkstemp(prefix="veil-abuse-")[1])
        with log.open("w") as sink:  # a file, not a pipe: nobody reads it until the end
            load = subprocess.Popen(
                [VEIL, "lab", "exec", "--name", LAB, "-n", ns, "client", "--", "python3",
                 "-c", LOAD, target, str(3 * seconds), str(port)],
                stdout=sink, text=True,
            )  # fmt: skip
        a = Attack()
        samples: list[tuple[float, int, float]] = []
        t0 = time.monotonic()

        async def main() -> None:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    trio.to_thread.run_sync,
                    sample,
                    pid,
                    0.5,
                    samples,
                    lambda: load.poll() is not None,
                )
                await trio.sleep(seconds)
                nursery.start_soon(
                    waypoint_attack if waypoint else attack, LAB, target, ctx, stop, a
                )
                await trio.sleep(seconds)
                stop.set()

        trio.run(main)
        load.wait(timeout=3 * seconds + 30)
        time.sleep(SETTLE)  # past the agent's next look at its heap (every 30 s)
        settled = rss_kb(pid)
        if waypoint:
            found = []  # its metrics port is the pod's; the RSS says it
        else:
            code, metrics = controlplane.agent_get(f"veil-{LAB}-node2", "/metrics", 15020)
            found = (
                re.findall(r"^veil_heap_(\w+)_total (\S+)$", metrics, re.M) if code == 200 else []
            )
        heap = {k: float(v) for k, v in found}
        out = log.read_text()
        log.unlink()
        rows = [
            (float(t), float(lat), int(ok))
            for t, lat, ok in (line.split() for line in out.splitlines())
        ]
        phases = {
            "before": phase_stats(rows, 0, seconds),
            "during": phase_stats(rows, seconds, 2 * seconds),
            "after": phase_stats(rows, 2 * seconds, 3 * seconds),
        }
        flag = " --waypoint" if waypoint else ""
        print(f"bench/abuse.py --seconds {seconds:g}{flag}  ({datetime.now():%Y-%m-%d %H:%M})")
        print(f"| phase | requests | errors | p50 | p99 | {who} RSS (peak) | its CPU |")
        print("|---|---|---|---|---|---|---|")
        for i, (name, ph) in enumerate(phases.items()):
            lo, hi = t0 + i * seconds, t0 + (i + 1) * seconds
            window = [(r, c) for t, r, c in samples if lo <= t < hi]
            peak = max((r for r, _ in window), default=0) / 1024
            cpu = (
                (window[-1][1] - window[0][1]) / seconds * 100 if len(window) > 1 else float("nan")
            )
            print(
                f"| {name} | {ph['requests']} | {ph['errors']} | {ph['p50']:.1f} ms "
                f"| {ph['p99']:.1f} ms | {peak:.1f} MB | {cpu:.0f} % |"
            )
        back = recovery(rows, 2 * seconds, phases["before"]["p50"])
        print(f"\nrecovered (1 s p50 within 1.5x of before) {back:.2f} s after the attack stopped")
        print("what the attack got:", ", ".join(f"{k}: {v}" for k, v in sorted(a.counts.items())))
        first = samples[0][1] / 1024 if samples else float("nan")
        print(
            f"{who} RSS: {first:.1f} MB at the start, {settled / 1024:.1f} MB {SETTLE:g} s "
            f"after the traffic ended (heap trims {heap.get('trims', float('nan')):.0f}, "
            f"{heap.get('returned_bytes', float('nan')) / 2**20:.1f} MB returned)"
        )
    finally:
        veil("lab", "down", "--name", LAB, check=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument(
        "--waypoint",
        action="store_true",
        help="the waypoint suite's lab: 500 slow HTTP clients through the waypoint instead",
    )
    args = parser.parse_args()
    run(args.seconds, args.waypoint)
