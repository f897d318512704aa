"""What one change costs an agent's state, with N pods in the cluster (the manifest source).

    .venv/bin/python bench/scale/state_update.py [--before] [N ...]   (default: 1000 5000 10000)

`--before`: the source as it was until 2026-12-03 (a stat walk of the directory every 0.2 s,
PyYAML's pure-Python loader): both are still its fallbacks, so an A/B in one checkout.

For each N: N pod manifests over 20 nodes (one file each, as the lab writes them), one
ambient namespace and one AuthorizationPolicy, in a fresh temporary directory, read by a
ManifestSource polling at its default interval (0.2 s). Then, measured in this process:

- first read: CPU to parse everything and publish the first snapshot;
- idle: CPU per second of polling with nothing changing (the stat walk);
- one pod's labels changed (5 times): wall time from the write to the new snapshot, and
  CPU spent until it is out; the same for the policy changed (DENY <-> ALLOW) -- the wall
  time includes up to one poll interval of waiting, so the policy's figure is the time from
  `lab apply` to a snapshot an agent enforces;
- what the agent does with each snapshot, on node1's ~N/20 pods: its identities
  (`identities_on_node`) and its label-following plan (`plan_reconcile`);
- the process's peak RSS after the first read (context: the state's memory per pod).

A benchmark: it asserts nothing. Prints one markdown table row per N.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import yaml

from veil.agent.enrollment import plan_reconcile
from veil.runtime.sources import manifests
from veil.runtime.store import StateStore

NODES = 20
CHANGES = 5


def pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "a", "name": f"p{i}", "labels": {"app": f"a{i % 10}"}},
        "spec": {
            "nodeName": f"node{i % NODES + 1}",
            "serviceAccountName": f"sa{i % 50}",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {
            "podIP": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


NAMESPACE = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "a", "labels": {"veil.dev/dataplane-mode": "ambient"}},
}


def policy(action: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "a", "name": "p"},
        "spec": {
            "selector": {"matchLabels": {"app": "a1"}},
            "action": action,
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/sa1"]}}]}],
        },
    }


async def change(store: StateStore, path: Path, text: str) -> tuple[float, float]:
    """(wall s, CPU s) from writing `text` to `path` until the snapshot that follows."""
    version = store.current.version
    wall, cpu = time.monotonic(), time.process_time()
    path.write_text(text)
    await store.wait_newer(version)
    return time.monotonic() - wall, time.process_time() - cpu


async def measure(root: Path, n: int, before: bool) -> dict[str, float]:
    store = StateStore()
    source = manifests.ManifestSource(root, watch=not before)
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        cpu = time.process_time()
        await nursery.start(source.run, store)
        out["first_cpu"] = time.process_time() - cpu
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu = time.process_time()
        await trio.sleep(2)
        out["idle_cpu"] = (time.process_time() - cpu) / 2
        pods = [
            await change(store, root / f"p{k}.yaml", yaml.safe_dump(relabel(k)))
            for k in range(CHANGES)
        ]
        actions = ["ALLOW", "DENY"] * CHANGES
        policies = [
            await change(store, root / "policy.yaml", yaml.safe_dump(policy(a)))
            for a in actions[:CHANGES]
        ]
        nursery.cancel_scope.cancel()
    for name, runs in (("pod", pods), ("policy", policies)):
        out[f"{name}_wall"] = statistics.median(w for w, _ in runs)
        out[f"{name}_cpu"] = statistics.median(c for _, c in runs)
    state = store.current
    cpu = time.process_time()
    for _ in range(10):
        state.__dict__.pop("workloads_by_node", None)  # as a new snapshot: not yet cached
        state.identities_on_node("node1", "cluster.local")
    out["identities_cpu"] = (time.process_time() - cpu) / 10
    mine = {w.key: w.uid for w in state.workloads if w.node == "node1"}
    cpu = time.process_time()
    for _ in range(10):
        plan_reconcile(state, "node1", mine, lambda w: "/run/netns/x")
    out["reconcile_cpu"] = (time.process_time() - cpu) / 10
    return out


def relabel(i: int) -> dict[str, Any]:
    p = pod(i)
    p["metadata"]["labels"]["app"] = "changed"
    return p


def write_cluster(root: Path, n: int) -> None:
    (root / "namespace.yaml").write_text(yaml.safe_dump(NAMESPACE))
    (root / "policy.yaml").write_text(yaml.safe_dump(policy("DENY")))
    for i in range(n):
        (root / f"p{i}.yaml").write_text(yaml.safe_dump(pod(i)))


def main() -> None:
    args = sys.argv[1:]
    before = "--before" in args
    if before:
        manifests.SAFE_LOADER = yaml.SafeLoader
    sizes = [int(a) for a in args if a != "--before"] or [1000, 5000, 10000]
    print(
        "| pods | first read CPU | idle CPU | one pod changed: latency / CPU "
        "| policy changed: latency / CPU | agent per snapshot: identities / reconcile | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="veil-scale-") as d:
            root = Path(d)
            write_cluster(root, n)
            r = trio.run(measure, root, n, before)
        ms = 1000
        print(
            f"| {n} | {r['first_cpu'] * ms:.0f} ms | {r['idle_cpu'] * 100:.1f} % "
            f"| {r['pod_wall'] * ms:.0f} ms / {r['pod_cpu'] * ms:.1f} ms "
            f"| {r['policy_wall'] * ms:.0f} ms / {r['policy_cpu'] * ms:.1f} ms "
            f"| {r['identities_cpu'] * ms:.2f} / {r['reconcile_cpu'] * ms:.2f} ms "
            f"| {r['rss_mb']:.0f} MB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
