"""`make demo`: bring up the lab with examples/shop, send real requests, summarise, tear down.

Every request runs the way a user would type it: `veil lab exec <pod> -- curl ...`. The demo
exits non-zero if any request fails, so it doubles as a smoke test of a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.lab import controlplane
from agent.lab import lab as labmod
from agent.lab.errors import LabError

VEIL = str(Path(sys.executable).parent / "veil")


@dataclass(frozen=True)
class Call:
    pod: str
    namespace: str
    url: str
    note: str


CALLS = (
    Call("client", "shop", "http://frontend.shop/", "service by name"),
    Call("client", "shop", "http://frontend.shop/", "service by name"),
    Call("client", "shop", "http://catalog:9080/items", "short name, same namespace"),
    Call("client", "shop", "http://orders.backoffice/", "other namespace"),
    Call("legacy", "backoffice", "http://cart.shop.svc.cluster.local:7070/", "full DNS name"),
)


def curl(lab: str, c: Call) -> tuple[dict[str, Any] | None, str]:
    proc = subprocess.run(
        [
            VEIL,
            "lab",
            "exec",
            "--name",
            lab,
            "-n",
            c.namespace,
            c.pod,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            c.url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None, (proc.stderr or proc.stdout).strip()
    try:
        return json.loads(proc.stdout), ""
    except ValueError:
        return None, f"not an echo answer: {proc.stdout[:80]!r}"


def print_identities(lab: str, st: dict[str, Any]) -> None:
    """What the CA issued: each node's agent and the certificates it holds (never keys)."""
    print("\n== identities: certificates from `veil ca`, held by each node's agent")
    print(f"  {'NODE':<8} {'IDENTITY':<52} {'SERIAL':<10} EXPIRES")
    for node in st["nodes"]:
        code, body = controlplane.agent_get(node["netns"], "/config_dump")
        if code != 200:
            print(f"  {node['name']:<8} agent not answering ({code})")
            continue
        for cert in json.loads(body)["certificates"]:
            print(
                f"  {node['name']:<8} {cert['identity']:<52} {cert.get('serial', '-')[:8]:<10} "
                f"{cert.get('notAfter', cert['state'])}"
            )


def run(paths: Sequence[str], lab: str, nodes: int, keep: bool) -> int:
    print(f"== veil lab up -f {' '.join(paths)} --name {lab} --nodes {nodes}")
    labmod.up(paths, lab, nodes)
    failures = 0
    try:
        st = labmod.status(lab)
        print(labmod.format_status(st))
        where = {(p["namespace"], p["name"]): p["node"] for p in st["pods"]}
        print("\n== requests (veil lab exec <pod> -- curl <url>)")
        print(f"  {'FROM':<26} {'URL':<44} {'ANSWERED BY':<28} {'SEEN CLIENT':<19} PATH")
        crossed = 0
        orders = next(p for p in st["pods"] if p["name"].startswith("orders-"))
        calls = (*CALLS, Call("client", "shop", f"http://{orders['ip']}:8080/", "pod IP"))
        for c in calls:
            answer, err = curl(lab, c)
            src = f"{c.namespace}/{c.pod} ({where[(c.namespace, c.pod)]})"
            if answer is None:
                failures += 1
                print(f"  {src:<26} {c.url:<44} FAILED: {err}")
                continue
            dst = f"{answer['namespace']}/{answer['pod']} ({answer['node']})"
            hop = "same node"
            if answer["node"] != where[(c.namespace, c.pod)]:
                hop, crossed = "crossed nodes", crossed + 1
            print(f"  {src:<26} {c.url:<44} {dst:<28} {answer['client']:<19} {hop}")
        spread: Counter[str] = Counter()
        for _ in range(20):
            answer, err = curl(lab, Call("client", "shop", "http://catalog:9080/", ""))
            if answer is None:
                failures += 1
                continue
            spread[f"{answer['pod']} ({answer['node']})"] += 1
        print("\n== load spread: 20 requests to the catalog VIP (v1 and v2 Deployments)")
        for pod, n in sorted(spread.items()):
            print(f"  {pod:<28} {n:>3} {'#' * n}")
        print(
            f"\n== summary: {len(calls) + 20 - failures} of {len(calls) + 20} requests "
            f"answered, {crossed} of {len(calls)} crossed nodes over the underlay, "
            f"{len(st['pods'])} pods on {len(st['nodes'])} nodes"
        )
        print_identities(lab, st)
        if keep:
            print(
                f"\nThe lab stays up (KEEP=1). Try:\n"
                f"  {VEIL} lab exec client -- curl -s http://frontend.shop/\n"
                f"  {VEIL} lab status\n  {VEIL} lab down"
            )
    finally:
        if not keep:
            print(f"\n== veil lab down --name {lab}")
            labmod.down(lab)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.lab.demo")
    p.add_argument("-f", "--filename", action="append", default=None)
    p.add_argument("--name", default="demo")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="leave the lab running")
    args = p.parse_args(argv)
    try:
        return run(args.filename or ["examples/shop/"], args.name, args.nodes, args.keep)
    except (LabError, ValueError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
