"""What one change costs an agent's state, with N pods in the cluster, from the Kubernetes API:
the real kube-apiserver and etcd of a kubernetes-mode lab (`make upstream` builds them).

    sudo .venv/bin/python bench/scale/state_update_api.py [N ...]   (default: 1000 5000 10000)

A one-node lab in kubernetes mode (`lab up --kubernetes`), then this script again as a
worker in node1's netns (where the agents reach the API), with the lab's admin kubeconfig.
The worker creates pods up to each N (cumulative; namespace `a`, ambient, 50 service
accounts; `schedulerName` served by no scheduler, so nothing runs them, their status set
through the API with an IP, Running and Ready as a kubelet would) and, for each N, starts a
fresh `KubernetesSource` (the agent's, every pod of the cluster) in its trio thread and
measures, as bench/scale/state_update.py does for the manifest source:

- first read: CPU of the source's thread to list everything and publish the first snapshot;
- idle: that thread's CPU per second with nothing changing (watches open);
- one pod's labels patched (5 times): wall time from the PATCH to the snapshot that holds
  it, and the source thread's CPU until then (the PATCH runs in another thread: not counted);
- an AuthorizationPolicy switched DENY <-> ALLOW (5 times): the same.

Writes go to the API server and etcd, which share this VM's two cores with the worker: the
wall times include their work. A benchmark: it asserts nothing. One markdown row per N.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.proc import veil  # noqa: E402

LAB = "apiscale"
NS = "a"
CHANGES = 5
CONCURRENCY = 16
HEAD = f"""apiVersion: v1
kind: Namespace
metadata: {{name: {NS}, labels: {{veil.dev/dataplane-mode: ambient}}}}
"""


def pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": NS, "name": f"p{i}", "labels": {"app": f"a{i % 10}"}},
        "spec": {
            "schedulerName": "veil-bench-none",  # no scheduler, no kubelet: an object only
            "serviceAccountName": "default",
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 8080}]}],
        },
    }


def status(i: int) -> dict[str, Any]:
    ip = f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }


def policy(action: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "a1"}},
            "action": action,
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}]}],
        },
    }


# -- the worker, in node1's netns ------------------------------------------------------------


def worker(kubeconfig: str, sizes: list[int]) -> None:
    import trio  # noqa: PLC0415
    from lightkube import AsyncClient, Client, KubeConfig  # noqa: PLC0415
    from lightkube.generic_resource import create_namespaced_resource  # noqa: PLC0415
    from lightkube.resources.core_v1 import Pod  # noqa: PLC0415

    from veil.runtime.sources.kubernetes import KubernetesSource  # noqa: PLC0415
    from veil.runtime.store import StateStore  # noqa: PLC0415

    config = KubeConfig.from_file(kubeconfig)
    sync = Client(config=config, field_manager="veil-bench")
    policy_kind = create_namespaced_resource(
        "security.veil.dev", "v1", "AuthorizationPolicy", "authorizationpolicies"
    )

    async def create(lo: int, hi: int) -> None:
        client = AsyncClient(config=config, field_manager="veil-bench")
        limit = trio.CapacityLimiter(CONCURRENCY)

        async def one(i: int) -> None:
            async with limit:
                await client.create(Pod.from_dict(pod(i)))  # type: ignore[call-overload]
                await client.patch(Pod.Status, f"p{i}", status(i), namespace=NS)

        async with trio.open_nursery() as n:
            for i in range(lo, hi):
                n.start_soon(one, i)
        await client.close()

    async def change(store: StateStore, write: Any, seen: Any) -> tuple[float, float]:
        """(wall s, source thread CPU s) from a write (in another thread) to its snapshot."""
        cpu, wall = time.thread_time(), time.monotonic()
        await trio.to_thread.run_sync(write)
        while not seen(store.current):
            await store.wait_newer(store.current.version)
        return time.monotonic() - wall, time.thread_time() - cpu

    async def measure(n: int) -> dict[str, float]:
        out: dict[str, float] = {}
        store = StateStore()
        client = AsyncClient(config=config, field_manager="veil")
        source = KubernetesSource(client)
        async with trio.open_nursery() as nursery:
            cpu = time.thread_time()
            await nursery.start(source.run, store)
            while len(store.current.workloads) < n:
                await store.wait_newer(store.current.version)
            out["first_cpu"] = time.thread_time() - cpu
            out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            cpu = time.thread_time()
            await trio.sleep(2)
            out["idle_cpu"] = (time.thread_time() - cpu) / 2
            pods = []
            for k in range(CHANGES):
                value = f"changed-{n}-{k}"

                def relabel(k: int = k, value: str = value) -> None:
                    patch = {"metadata": {"labels": {"app": value}}}
                    sync.patch(Pod, f"p{k}", patch, namespace=NS)

                def has(st: Any, k: int = k, value: str = value) -> bool:
                    w = st.workload(NS, f"p{k}")
                    return w is not None and w.labels.get("app") == value

                pods.append(await change(store, relabel, has))
            policies = []
            for k in range(CHANGES):
                action = ("ALLOW", "DENY")[k % 2]

                def switch(action: str = action) -> None:
                    sync.apply(policy_kind.from_dict(policy(action)), force=True)

                def holds(st: Any, action: str = action) -> bool:
                    return any(p.action == action for p in st.policies.policies.values())

                policies.append(await change(store, switch, holds))
            nursery.cancel_scope.cancel()
        await client.close()
        for name, runs in (("pod", pods), ("policy", policies)):
            out[f"{name}_wall"] = statistics.median(w for w, _ in runs)
            out[f"{name}_cpu"] = statistics.median(c for _, c in runs)
        return out

    sync.apply(policy_kind.from_dict(policy("DENY")), force=True)
    have = 0
    for n in sizes:
        started = time.monotonic()
        trio.run(create, have, n)
        made = time.monotonic() - started
        have = n
        r = trio.run(measure, n)
        ms = 1000
        print(
            f"| {n} | {made:.0f} s | {r['first_cpu'] * ms:.0f} ms | {r['idle_cpu'] * 100:.1f} % "
            f"| {r['pod_wall'] * ms:.0f} ms / {r['pod_cpu'] * ms:.1f} ms "
            f"| {r['policy_wall'] * ms:.0f} ms / {r['policy_cpu'] * ms:.1f} ms "
            f"| {r['rss_mb']:.0f} MB |",
            flush=True,
        )


# -- the driver ------------------------------------------------------------------------------


def main() -> None:
    sizes = sorted(int(a) for a in sys.argv[1:]) or [1000, 5000, 10000]
    print(f"bench/scale/state_update_api.py {' '.join(map(str, sizes))}  ({time.ctime()})")
    print(
        "| pods | pods created in | first read CPU | idle CPU | one pod changed: latency / CPU "
        "| policy changed: latency / CPU | worker peak RSS |"
    )
    print("|---|---|---|---|---|---|---|", flush=True)
    veil("lab", "down", "--name", LAB, check=False)
    with tempfile.TemporaryDirectory(prefix="veil-apiscale-") as d:
        manifest = Path(d) / "a.yaml"
        manifest.write_text(HEAD)
        veil("lab", "up", "-f", str(manifest), "--name", LAB, "--kubernetes", "--nodes", "1")
        try:
            kubeconfig = Path(d) / "admin.kubeconfig"
            kubeconfig.write_text(veil("lab", "kubeconfig", "--name", LAB))
            netns = f"veil-{LAB}-node1"
            subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, __file__, "--worker",
                 str(kubeconfig), *map(str, sizes)],
                check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )  # fmt: skip
        finally:
            veil("lab", "down", "--name", LAB, check=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], [int(a) for a in sys.argv[3:]])
    else:
        main()
