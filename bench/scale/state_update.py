"""How much CPU one changed object costs the manifest source, with N pods in the cluster.

    .venv/bin/python bench/scale/state_update.py /tmp/veil-scale 1000

Writes N pod manifests into DIR (one file each, as the lab does), starts a ManifestSource,
then changes one pod's labels five times and prints the process's CPU time until each new
snapshot is out (the poll's stat walk included). A benchmark: it asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import trio
import yaml

from veil.runtime.sources import manifests
from veil.runtime.store import StateStore


def pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "a", "name": f"p{i}", "labels": {"app": f"a{i % 10}"}},
        "spec": {
            "nodeName": "node1",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {
            "podIP": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def measure(root: Path, n: int) -> str:
    store = StateStore()
    source = manifests.ManifestSource(root, interval=0.01)
    async with trio.open_nursery() as nursery:
        started = time.process_time()
        await nursery.start(source.run, store)
        first = time.process_time() - started
        times = []
        for k in range(5):
            version = store.current.version
            path = root / f"p{k}.yaml"
            path.write_text(path.read_text().replace("app: a", "app: b"))
            started = time.process_time()
            await store.wait_newer(version)
            times.append(time.process_time() - started)
        nursery.cancel_scope.cancel()
    return (
        f"{n} pods: first read {first * 1000:.0f} ms CPU; one pod changed: "
        f"{min(times) * 1000:.1f}-{max(times) * 1000:.1f} ms CPU (with the poll's stat walk)"
    )


def main() -> None:
    root, n = Path(sys.argv[1]), int(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"p{i}.yaml").write_text(yaml.safe_dump(pod(i)))
    print(trio.run(measure, root, n))


if __name__ == "__main__":
    main()
