"""Pods per node on the lab: bring-up, enrollment, the agent's memory and idle CPU, and the
time from `lab apply` of a policy to its enforcement, with N pods per node.

    sudo .venv/bin/python bench/scale/pods.py [N ...]        (default: 25 100 240 500)

For each N: a lab of two nodes (manifest mode, iptables capture) with one ambient namespace
holding N pods per node (`sleep`, each with its own service account: an identity each, as
workloads have) plus an echo server on node2 and a client on node1. Measured:

- `lab up`: wall time until every pod is ready;
- enrollment: node1's CNI ADDs as the agent logged them (first to last), per pod;
- the agent's RSS (node1) at rest, and per enrolled pod against the N of the first size;
- the agent's idle CPU over 10 s with everything enrolled;
- the namespace labelled out of the mesh, then back in: seconds until node1's agent has
  released, then enrolled again, all its pods (`veil lab label`; the times from its log);
- policy to enforcement: `lab apply` of a DENY for the client until its next connection is
  refused (polled with curl), median of 3, and the same for its removal;
- 10 000 idle connections held through the mesh (client -> 8 echo servers on node2, since
  a node's pods may hold 1600 to one pod): how many were refused or cut, and the agent's RSS
  per connection (node1, the client's side).

A benchmark: it asserts nothing. Prints one markdown table row per N. Past what a /24 holds
(245 pods a node, with the servers) the lab gets a /23 or /22 per node, so N stops at 1000.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.proc import VEIL, cpu_s, rss_kb, veil  # noqa: E402
from veil.lab import controlplane, store  # noqa: E402

LAB = "scale"

HEAD = """apiVersion: v1
kind: Namespace
metadata: {name: s, labels: {veil.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: s}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: s}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{name: c, image: busybox, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: s, labels: {app: server}}
spec:
  nodeName: node2
  containers: [{name: c, image: veil/echo, command: [veil, echo, --port, "8080"]}]
"""
HOLDERS = 8  # echo servers on node2 the held connections spread over
HOLDER = """---
apiVersion: v1
kind: Pod
metadata: {{name: hold{k}, namespace: s, labels: {{app: hold}}}}
spec:
  nodeName: node2
  containers: [{{name: c, image: veil/echo, command: [veil, echo, --port, "8080"]}}]
"""

POD = """---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sa{i}, namespace: s}}
---
apiVersion: v1
kind: Pod
metadata: {{name: p{i}, namespace: s}}
spec:
  nodeName: node{node}
  serviceAccountName: sa{i}
  containers: [{{name: c, image: busybox, command: [sleep, infinity]}}]
"""

DENY = """apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: s}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/s/sa/client]}}]}]
"""

HOLD = """
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
socks, failed, servers = [], 0, sys.argv[2:]
for i in range(int(sys.argv[1])):
    try:
        socks.append(socket.create_connection((servers[i % len(servers)], 8080), timeout=20))
    except OSError:
        failed += 1
time.sleep(1)
alive = 0
for s in socks:  # a connection the mesh refused or reset reads as closed
    s.setblocking(False)
    try:
        alive += s.recv(1) != b""
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(f"held {alive} failed {failed + len(socks) - alive}", flush=True)
time.sleep(3600)
"""
CONNS = 10000  # issue 23: up to 10k per node (one node's pods may hold 1600 to one pod)


def curl_ok(server: str) -> bool:
    out = subprocess.run(
        [VEIL, "lab", "exec", "--name", LAB, "-n", "s", "client", "--", "curl", "-s", "-o",
         "/dev/null", "--max-time", "2", f"http://{server}:8080/"],
        capture_output=True, check=False,
    )  # fmt: skip
    return out.returncode == 0


def enforce_time(tmp: Path, server: str, apply: bool) -> float:
    """From `lab apply` (or delete) to the first connection that shows it."""
    started = time.monotonic()
    if apply:
        (tmp / "deny.yaml").write_text(DENY)
        veil("lab", "apply", "--name", LAB, "-f", str(tmp / "deny.yaml"))
    else:
        veil("lab", "delete", "--name", LAB, "authorizationpolicy", "deny-client", "-n", "s")
    while curl_ok(server) == apply:
        if time.monotonic() - started > 30:
            return float("nan")
    return time.monotonic() - started


def enrollment_span(log: Path, after: datetime) -> tuple[int, float, float]:
    """(ADDs, seconds from the first to the last, median ms the agent spent on one) of
    node1's CNI ADDs that enrolled a pod."""
    stamps, took = [], []
    for line in log.read_text().splitlines():
        if "cni ADD s/" in line and "'enrolled': True" in line:
            t = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            if t >= after:
                stamps.append(t)
                if m := re.search(r"\((\d+) ms\)$", line):
                    took.append(float(m.group(1)))
    span = (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else 0.0
    return len(stamps), span, statistics.median(took) if took else float("nan")


def relabel_time(value: str, pods: int) -> float:
    """`veil lab label namespace s` to `value` (`-` removes it) until node1's agent logged
    `pods` of its pods enrolled (or released): the last line's time, from the command's
    start. Read from the agent's log, not asked (asking costs the agent CPU meanwhile)."""
    change = f"veil.dev/dataplane-mode={value}" if value != "-" else "veil.dev/dataplane-mode-"
    word = "released" if value == "-" else "enrolled"
    log = store.lab_dir(LAB) / "logs" / "agent-node1.log"
    offset = log.stat().st_size
    started, deadline = datetime.now(), time.monotonic() + 300
    veil("lab", "label", "--name", LAB, "namespace", "s", change)
    while time.monotonic() < deadline:
        with log.open() as f:
            f.seek(offset)
            lines = [ln for ln in f.read().splitlines() if f" {word} s/" in ln]
        if len(lines) >= pods:
            last = datetime.strptime(lines[pods - 1][:23], "%Y-%m-%d %H:%M:%S,%f")
            return (last - started).total_seconds()
        time.sleep(0.2)
    return float("nan")


def measure(n: int, tmp: Path) -> dict[str, Any]:
    manifests = tmp / f"scale-{n}.yaml"
    manifests.write_text(
        HEAD
        + "".join(HOLDER.format(k=k) for k in range(HOLDERS))
        + "".join(POD.format(i=i, node=1 + i % 2) for i in range(2 * n))
    )
    veil("lab", "down", "--name", LAB, check=False)
    began = datetime.now()
    started = time.monotonic()
    on_node2 = n + 1 + HOLDERS
    mask = "24" if on_node2 <= 245 else "23" if on_node2 <= 501 else "22"
    veil(
        "lab", "up", "-f", str(manifests), "--name", LAB, "--timeout", "1200",
        "--node-cidr-mask-size", mask,
    )  # fmt: skip
    up = time.monotonic() - started
    out: dict[str, Any] = {"n": n, "up": up}
    try:
        log = store.lab_dir(LAB) / "logs" / "agent-node1.log"
        out["adds"], out["enroll_span"], out["agent_ms"] = enrollment_span(log, began)
        pid = int(controlplane.agent_process(LAB, "node1")["pid"])
        time.sleep(5)  # settled
        out["rss_kb"] = rss_kb(pid)
        cpu = cpu_s(pid)
        time.sleep(10)
        out["idle_cpu"] = (cpu_s(pid) - cpu) / 10
        out["release"] = relabel_time("-", n + 1)
        out["enroll"] = relabel_time("ambient", n + 1)
        st = json.loads(veil("lab", "status", "--name", LAB, "-o", "json"))
        server = next(p["ip"] for p in st["pods"] if p["name"] == "server")
        holders = [p["ip"] for p in st["pods"] if p["name"].startswith("hold")]
        assert curl_ok(server), "the mesh does not work"
        deny, allow = [], []
        for _ in range(3):
            deny.append(enforce_time(tmp, server, apply=True))
            allow.append(enforce_time(tmp, server, apply=False))
        out["deny"], out["allow"] = statistics.median(deny), statistics.median(allow)
        before = rss_kb(pid)
        holder = subprocess.Popen(
            [VEIL, "lab", "exec", "--name", LAB, "-n", "s", "client", "--", "python3", "-c",
             HOLD, str(CONNS), *holders],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline().split()
            if line[:1] == ["held"]:
                out["held"], out["failed"] = int(line[1]), int(line[3])
                time.sleep(2)
                out["conn_kb"] = (rss_kb(pid) - before) / CONNS
        finally:
            holder.kill()
            holder.wait()
    finally:
        veil("lab", "down", "--name", LAB, check=False)
    return out


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [25, 100, 240, 500]
    if max(sizes) > 1000:
        sys.exit("at most 1000 pods per node (the lab's /22 per node, with the servers)")
    print(f"bench/scale/pods.py {' '.join(map(str, sizes))}  ({datetime.now():%Y-%m-%d %H:%M})")
    print(
        "| pods per node | lab up | enrollment on node1 (ADDs, first to last; the agent's "
        "median per ADD) | agent RSS "
        "| idle CPU | namespace out / in (node1) | DENY enforced / lifted after `lab apply` "
        f"| {CONNS} connections held: refused / RSS each |"
    )
    print("|---|---|---|---|---|---|---|---|")
    first: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="veil-scale-") as d:
        for n in sizes:
            r = measure(n, Path(d))
            per_pod = ""
            if first is not None and n > first["n"]:
                extra = (r["rss_kb"] - first["rss_kb"]) / (n - first["n"])
                per_pod = f" (+{extra:.0f} KB per pod over {first['n']})"
            first = first or r
            per_add = r["enroll_span"] / max(1, r["adds"] - 1) * 1000
            print(
                f"| {n} | {r['up']:.1f} s | {r['adds']} in {r['enroll_span']:.1f} s "
                f"({per_add:.0f} ms apart; {r['agent_ms']:.0f} ms in the agent) "
                f"| {r['rss_kb'] / 1024:.1f} MB{per_pod} "
                f"| {r['idle_cpu'] * 100:.1f} % | {r['release']:.1f} / {r['enroll']:.1f} s "
                f"| {r['deny']:.2f} / {r['allow']:.2f} s "
                f"| {r.get('failed', '?')} / {r.get('conn_kb', float('nan')):.1f} KB |",
                flush=True,
            )


if __name__ == "__main__":
    if re.fullmatch(r"[0-9 ]*", " ".join(sys.argv[1:])) is None:
        sys.exit(__doc__)
    main()
