"""ManifestSource: cluster state from a directory of Kubernetes YAML (what the lab writes).

The directory is polled (a stat of every file, every `interval` seconds; the lab's state
lives on tmpfs, so this is cheap and needs no inotify) and re-read whole when anything
changed, so every snapshot is a consistent read of the directory. A file that cannot be parsed
is reported in the snapshot's `errors` and skipped; the rest still applies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
import yaml

from agent.state.model import MeshState, build_state
from agent.state.store import StateStore

log = logging.getLogger("veil.state")

Signature = tuple[tuple[str, int, int], ...]


def signature(root: Path) -> Signature:
    out = []
    for p in sorted(root.rglob("*.yaml")):
        if p.name.startswith("."):
            continue  # a writer's temporary file
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_directory(root: Path, version: int) -> MeshState:
    objects: list[Mapping[str, Any]] = []
    errors: list[str] = []
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("."):
            continue
        try:
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict):
                    objects.append(doc)
        except FileNotFoundError:
            continue  # removed between listing and reading; the next poll sees it
        except yaml.YAMLError as e:
            errors.append(f"{path}: invalid YAML: {e}")
    state = build_state(objects, version)
    if errors:
        state = MeshState(
            version=state.version,
            namespaces=state.namespaces,
            workloads=state.workloads,
            services=state.services,
            others=state.others,
            errors=(*state.errors, *errors),
        )
    return state


class ManifestSource:
    def __init__(self, root: Path, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval

    async def run(
        self, store: StateStore, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish a snapshot now, then one per change, until cancelled."""
        last: Signature | None = None
        version = store.current.version
        started = False
        while True:
            sig = await trio.to_thread.run_sync(signature, self.root)
            if sig != last:
                version += 1
                state = await trio.to_thread.run_sync(read_directory, self.root, version)
                for err in state.errors:
                    log.warning("state: %s", err)
                store.update(state)
                last = sig
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.interval)
