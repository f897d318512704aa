"""L7 benchmark on the lab: Veil's waypoint vs Envoy as the waypoint, same path, same load.

    sudo .venv/bin/python bench/waypoint.py [--requests 20000] [--clients 4] [--json FILE]

Topology: namespace `bench` enrolled, `client` on node1, `server` on node2 answering with
Envoy's direct_response (a C++ backend, so the backend is never the bottleneck), a Gateway of
class veil-waypoint whose pod runs on node2. h2load (nghttp2) in the client pod sends
HTTP/1.1 keep-alive requests over `--clients` connections; every request goes

    client -> agent node1 == HBONE ==> waypoint == HBONE ==> agent node2 -> server

Paths, one after the other on the same pods:
  mesh-l4   the namespace without `use-waypoint`: agent to agent only (the floor)
  veil      `veil waypoint` as the L7 proxy (HTTPRoute-free default route)
  envoy     the waypoint pod's process replaced by Envoy 1.40 with the waypoint's certificate:
            HBONE in (HCM terminating CONNECT) -> an HTTP listener that routes -> an HTTP/1.1
            connection pool whose connections are CONNECT tunnels to the server's 15008
Per path: requests/s, latency p50/p99 (h2load's per-request log), the L7 proxy's CPU
milliseconds per request, and its RSS before its first request and the most it reached under
the measured load. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.envoy import (  # noqa: E402
    ENVOY,
    HCM,
    ROUTER,
    EnvoyProcess,
    hbone_client,
    hbone_server,
)

from bench.hbone import cpu_seconds, mesh_cert  # noqa: E402
from bench.proc import RssPeak  # noqa: E402
from veil.core.spiffe import SpiffeId  # noqa: E402
from veil.lab import lab as labmod  # noqa: E402
from veil.lab import store, supervise  # noqa: E402

LAB = "benchwp"
TD = "cluster.local"


def backend_config() -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": 9080}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "backend",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "ok\n"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    }


def manifests(work: Path) -> Path:
    (work / "backend.json").write_text(json.dumps(backend_config()))
    flags = [
        "--concurrency",
        "1",
        "--base-id",
        "77",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    envoy_cmd = json.dumps([ENVOY, "-c", str(work / "backend.json"), *flags])
    (work / "bench.yaml").write_text(f"""
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels: {{veil.dev/dataplane-mode: ambient, veil.dev/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: bench}}
spec:
  gatewayClassName: veil-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
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
metadata: {{name: server, namespace: bench, labels: {{app: server}}}}
spec:
  nodeName: node2
  serviceAccountName: server
  containers:
    - name: envoy
      command: {envoy_cmd}
      ports: [{{containerPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: bench}}
spec:
  selector: {{app: server}}
  ports: [{{port: 9080, targetPort: 9080}}]
""")
    return work / "bench.yaml"


def envoy_waypoint(wp_ip: str, server_ip: str, cert: tuple[Path, Path, Path]) -> dict[str, Any]:
    """Three listeners: HBONE in -> HTTP routing -> HBONE out (a pool of CONNECT tunnels)."""
    inbound = hbone_server((wp_ip, 15008), ("127.0.0.1", 15100), TD, *cert)
    outbound = hbone_client(
        ("127.0.0.1", 15101),
        (server_ip, 15008),
        f"{server_ip}:9080",
        f"spiffe://{TD}/ns/bench/sa/server",
        *cert,
    )
    router = backend_config()["static_resources"]["listeners"][0]
    router["name"] = "l7"
    router["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 15100}}
    hcm = router["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "l7"
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
    ]
    backend = {
        "name": "backend",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": "backend",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": 15101}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    sr = inbound["static_resources"]
    sr["listeners"] += [router, *outbound["static_resources"]["listeners"]]
    sr["clusters"] += [backend, *outbound["static_resources"]["clusters"]]
    return inbound


def h2load(requests: int, clients: int, work: Path) -> dict[str, Any]:
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "veil"),
            "lab",
            "exec",
            "--name",
            LAB,
            "-n",
            "bench",
            "client",
            "--",
            "h2load",
            "--h1",
            "-n",
            str(requests),
            "-c",
            str(clients),
            f"--log-file={log}",
            "http://server.bench:9080/",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    took = time.monotonic() - started
    lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    ok = sum(1 for line in log.read_text().splitlines() if line.split("\t")[1] == "200")
    if ok < requests:
        print(proc.stdout[-1500:], file=sys.stderr)
    rps = next(
        (
            float(line.split()[3])
            for line in proc.stdout.splitlines()
            if line.startswith("finished in")
        ),
        requests / took,
    )
    return {
        "req_s": rps,
        "p50_us": statistics.median(lat),
        "p99_us": lat[int(len(lat) * 0.99) - 1],
        "ok": ok,
    }


def measure(requests: int, clients: int, work: Path, proxy_pids: list[int]) -> dict[str, Any]:
    rest = RssPeak(proxy_pids).mb() if proxy_pids else None  # before its first request
    h2load(max(500, requests // 10), clients, work)  # warm-up: connections, certificates
    before = cpu_seconds(proxy_pids) if proxy_pids else 0.0
    with RssPeak(proxy_pids) as rss:
        r = h2load(requests, clients, work)
    cpu = cpu_seconds(proxy_pids) - before if proxy_pids else 0.0
    r["cpu_ms_per_req"] = cpu * 1000 / requests if proxy_pids else None
    r["rss_rest_mb"], r["rss_peak_mb"] = rest, (rss.peak if proxy_pids else None)
    return r


def pod_pids(name: str, own: bool = False) -> list[int]:
    """A pod's processes as the lab started them (a waypoint's: its supervisors), or with
    `own` the daemons themselves (whose CPU is measured)."""
    record = store.read_record(LAB) or {}
    entry = next(p for p in record["pods"] if p["name"] == name)
    if own and entry.get("states"):
        return [int(supervise.read_state(Path(f))["pid"]) for f in entry["states"]]
    return list(entry["pids"])


def run(requests: int, clients: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        labmod.up([manifests(work)], LAB, 2, log=lambda _m: None)
        try:
            st = labmod.status(LAB)
            ip = {p["name"]: p["ip"] for p in st["pods"]}
            node = {p["name"]: p["node"] for p in st["pods"]}
            print("mesh-l4 ... ", end="", flush=True)
            labmod.label(LAB, "namespace", "bench", None, ["veil.dev/use-waypoint-"])
            time.sleep(1.5)
            results["mesh-l4"] = measure(requests, clients, work, [])
            labmod.label(LAB, "namespace", "bench", None, ["veil.dev/use-waypoint=waypoint"])
            time.sleep(1.5)
            print("veil ... ", end="", flush=True)
            results["veil"] = measure(requests, clients, work, pod_pids("waypoint-0", own=True))
            print("envoy ... ", end="", flush=True)
            cert = mesh_cert(
                node["waypoint-0"], SpiffeId(TD, "bench", "waypoint"), work / "wp", LAB
            )
            for pid in pod_pids("waypoint-0"):
                os.kill(pid, signal.SIGTERM)
            time.sleep(1.0)
            envoy = EnvoyProcess(
                f"/run/netns/veil-{LAB}-bench_waypoint-0",
                envoy_waypoint(ip["waypoint-0"], ip["server"], cert),
                work,
                "envoy-waypoint",
            )
            try:
                envoy.wait_started()
                results["envoy"] = measure(requests, clients, work, [envoy.proc.pid])
            finally:
                envoy.stop()
            print("done")
        finally:
            labmod.down(LAB, log=lambda _m: None)
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| path | requests/s | p50 µs | p99 µs | L7 proxy CPU-ms per request "
        "| L7 proxy RSS MB at rest / under load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("mesh-l4", "veil", "envoy"):
        r = results[name]
        cpu = "-" if r["cpu_ms_per_req"] is None else f"{r['cpu_ms_per_req']:.3f}"
        rss = (
            "-" if r["rss_rest_mb"] is None else f"{r['rss_rest_mb']:.1f} / {r['rss_peak_mb']:.1f}"
        )
        lines.append(
            f"| {name} | {r['req_s']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {cpu} | {rss} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it builds a lab)", file=sys.stderr)
        return 1
    results = run(args.requests, args.clients)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{stamp}, {os.cpu_count()} cores, {args.requests} HTTP/1.1 requests over "
        f"{args.clients} keep-alive connections (h2load --h1)\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"date": stamp, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
