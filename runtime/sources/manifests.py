"""ManifestSource: cluster state from a directory of Kubernetes YAML (what the lab writes).

The directory is polled (a stat of every file, every `interval` seconds, in the event loop: on
the lab's tmpfs a walk takes ~0.1 ms, less than handing it to a thread, whose GIL hand-offs
would slow the proxies' tasks); the files that changed are re-read (in a thread) and their
objects applied to the state as events, so a snapshot is published per poll that saw a
change. A file that cannot be parsed is reported in the snapshot's `errors` and in
`not_synced()` (readiness), and the objects it held before stay in force: a policy file
garbled by a bad write must not lift its DENY (fail closed). Names starting with a dot (a
writer's temporary file) are ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from veil.core.state import ObjectKey, StateBuilder, object_key
from veil.runtime.sources.jwks import fetch_jwks
from veil.runtime.store import StateStore

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


@dataclass
class _File:
    mtime: int
    size: int
    keys: list[ObjectKey]  # the objects it holds
    error: str | None = None


Parsed = tuple[str, list[Mapping[str, Any]] | None, str | None]  # path, documents, error


def parse_files(paths: Iterable[str]) -> list[Parsed]:
    """Read and parse these manifests (run in a thread: YAML is slow); a file removed since
    it was listed comes back with no documents, one that cannot be parsed with an error."""
    out: list[Parsed] = []
    for path in paths:
        try:
            loaded = yaml.safe_load_all(Path(path).read_text())
            docs: list[Mapping[str, Any]] = [d for d in loaded if isinstance(d, dict)]
        except FileNotFoundError:
            out.append((path, None, None))  # removed between listing and reading
            continue
        except yaml.YAMLError as e:
            out.append((path, [], f"{path}: invalid YAML: {e}"))
            continue
        out.append((path, docs, None))
    return out


class ManifestSource:
    """Re-reads only the files that changed, and hands their objects to a `StateBuilder` as
    events: a change to one object costs one file's parse and one conversion, not the
    directory's."""

    def not_synced(self) -> str | None:
        """A file that cannot be parsed: its last good objects are in force, not what it says."""
        broken = sorted(f.error for f in self._files.values() if f.error)
        if not broken:
            return None
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        return f"{broken[0]}{more}; its last readable version stays in force"

    def __init__(self, root: Path, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.builder = StateBuilder(fetch_jwks)
        self._files: dict[str, _File] = {}

    def _apply(self, sig: Signature, parsed: list[Parsed]) -> None:
        listed = {path: (mtime, size) for path, mtime, size in sig}
        for path in [p for p in self._files if p not in listed]:
            for key in self._files.pop(path).keys:
                self.builder.delete(key)
        for path, docs, error in parsed:
            old = self._files.pop(path, None)
            old_keys = old.keys if old else []
            if docs is None:  # gone after all: the next poll lists it no more
                for key in old_keys:
                    self.builder.delete(key)
                continue
            mtime, size = listed[path]
            if error is not None:  # unreadable now: what it held stays, the error is said
                self._files[path] = _File(mtime, size, old_keys, error)
                continue
            keys = [object_key(d) for d in docs]
            for key in set(old_keys) - set(keys):
                self.builder.delete(key)
            for d in docs:
                self.builder.apply(d)
            self._files[path] = _File(mtime, size, keys, error)

    def _changed(self, sig: Signature) -> list[str]:
        return [
            path
            for path, mtime, size in sig
            if (f := self._files.get(path)) is None or (f.mtime, f.size) != (mtime, size)
        ]

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
                parsed = await trio.to_thread.run_sync(parse_files, self._changed(sig))
                self._apply(sig, parsed)
                errors = [f.error for f in self._files.values() if f.error]
                state = self.builder.snapshot(version, errors)
                for err in state.errors:
                    log.warning("state: %s", err)
                store.update(state)
                last = sig
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.interval)
