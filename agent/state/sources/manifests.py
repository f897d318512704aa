"""ManifestSource: cluster state from a directory of Kubernetes YAML (what the lab writes).

The directory is polled (a stat of every file, every `interval` seconds, in the event loop: on
the lab's tmpfs a walk takes ~0.1 ms, less than handing it to a thread, whose GIL hand-offs
would slow the proxies' tasks) and re-read whole (in a thread) when anything changed, so every
snapshot is a consistent read of the directory. A file that cannot be parsed is reported in
the snapshot's `errors` and skipped; the rest still applies. Names starting with a dot (a
writer's temporary file) are ignored.
"""

from __future__ import annotations

import logging
import os
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
    """(path, mtime, size) of every manifest under `root`, sorted."""
    out = []
    dirs = [str(root)]
    while dirs:
        try:
            entries = os.scandir(dirs.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for e in entries:
                if e.name.startswith("."):
                    continue  # a writer's temporary file
                if e.is_dir(follow_symlinks=False):
                    dirs.append(e.path)
                elif e.name.endswith(".yaml"):
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    out.append((e.path, st.st_mtime_ns, st.st_size))
    out.sort()
    return tuple(out)


def read_directory(root: Path, version: int) -> MeshState:
    objects: list[Mapping[str, Any]] = []
    errors: list[str] = []
    for name, _, _ in signature(root):
        path = Path(name)
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
            sig = signature(self.root)
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
