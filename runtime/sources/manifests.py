"""ManifestSource: cluster state from a directory of Kubernetes YAML (what the lab writes).

The directory is watched with inotify (every subdirectory, new ones as they appear): the files
an event names are re-read (in a thread, after a short settle so a burst of writes makes one
snapshot) and their objects applied to the state as events, so one change costs that file,
not the directory: with 10 000 pods a stat walk of every file took ~30 ms, five times a
second. A full walk still runs every `resync` seconds (and after an event-queue overflow), to
mend anything a watch missed; where inotify is unavailable (no watches left, say) the
directory is polled every `interval` seconds instead, as before.

A file that cannot be parsed is reported in the snapshot's `errors` and in `not_synced()`
(readiness), and the objects it held before stay in force: a policy file garbled by a bad
write must not lift its DENY (fail closed). Names starting with a dot (a writer's temporary
file) are ignored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml
from inotify_simple import INotify
from inotify_simple import flags as inflags

from veil.core.state import ObjectKey, StateBuilder, object_key
from veil.runtime.sources.jwks import fetch_jwks
from veil.runtime.store import StateStore

log = logging.getLogger("veil.state")

Signature = tuple[tuple[str, int, int], ...]
RESYNC = 30.0  # seconds between full walks while inotify watches (mends anything missed)
# libyaml's safe loader where PyYAML has it (~10x faster: 10 000 pods read in 8 s of CPU with
# the pure-Python one); the same safe constructors either way.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SETTLE = 0.02  # seconds an event waits for the ones that follow it (one snapshot per burst)


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
            loaded = yaml.load_all(Path(path).read_text(), Loader=SAFE_LOADER)
            docs: list[Mapping[str, Any]] = [d for d in loaded if isinstance(d, dict)]
        except FileNotFoundError:
            out.append((path, None, None))  # removed between listing and reading
            continue
        except yaml.YAMLError as e:
            out.append((path, [], f"{path}: invalid YAML: {e}"))
            continue
        out.append((path, docs, None))
    return out


class DirWatcher:
    """inotify on a directory tree: which paths changed since the last call."""

    MASK = (
        inflags.CLOSE_WRITE
        | inflags.MOVED_TO
        | inflags.MOVED_FROM
        | inflags.DELETE
        | inflags.CREATE
    )

    def __init__(self, root: Path) -> None:
        self.inotify = INotify(nonblocking=True)
        self.dirs: dict[int, str] = {}
        try:
            self.add_tree(str(root))
        except BaseException:
            self.inotify.close()
            raise

    def close(self) -> None:
        self.inotify.close()

    def add_tree(self, top: str) -> list[str]:
        """Watch `top` and every directory under it; the manifests already there (a new
        directory's files may predate its watch)."""
        found = []
        for d, subdirs, files in os.walk(top):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            self.dirs[self.inotify.add_watch(d, self.MASK)] = d
            found += [f"{d}/{f}" for f in files]
        return found

    async def changes(self, settle: float) -> set[str] | None:
        """The paths named by the next events (directories created: their files); None when
        the kernel's queue overflowed (a full walk is needed)."""
        await trio.lowlevel.wait_readable(self.inotify.fileno())
        await trio.sleep(settle)  # a burst of writes (lab up, apply -f DIR): one snapshot
        paths: set[str] = set()
        for ev in self.inotify.read(timeout=0):
            if ev.mask & inflags.Q_OVERFLOW:
                return None
            d = self.dirs.get(ev.wd)
            if d is None:
                continue
            if ev.mask & inflags.IGNORED:  # the directory is gone
                del self.dirs[ev.wd]
                continue
            path = f"{d}/{ev.name}"
            if ev.mask & inflags.ISDIR:
                if ev.mask & (inflags.CREATE | inflags.MOVED_TO) and not ev.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        paths.update(self.add_tree(path))
                paths.add(path + "/")  # for removals: every file known under it
            else:
                paths.add(path)
        return paths


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

    def __init__(
        self,
        root: Path,
        interval: float = 0.2,
        *,
        resync: float = RESYNC,
        settle: float = SETTLE,
        watch: bool = True,
    ) -> None:
        self.root = root
        self.interval = interval  # the poll's, where inotify is unavailable
        self.resync, self.settle, self.watch = resync, settle, watch
        self.builder = StateBuilder(fetch_jwks)
        self._files: dict[str, _File] = {}
        self.watching = False  # inotify in use (else polling)

    def _apply(
        self, listed: Mapping[str, tuple[int, int]], removed: Iterable[str], parsed: list[Parsed]
    ) -> None:
        """`parsed` files (with their `listed` mtime and size) applied, `removed` ones'
        objects deleted."""
        for path in removed:
            if (gone := self._files.pop(path, None)) is not None:
                for key in gone.keys:
                    self.builder.delete(key)
        for path, docs, error in parsed:
            old = self._files.pop(path, None)
            old_keys = old.keys if old else []
            if docs is None or path not in listed:  # gone after all
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

    def _scan(self) -> tuple[dict[str, tuple[int, int]], list[str], list[str]]:
        """A full walk: (stats, files to read, files removed)."""
        listed = {path: (mtime, size) for path, mtime, size in signature(self.root)}
        changed = [
            path
            for path, stat in listed.items()
            if (f := self._files.get(path)) is None or (f.mtime, f.size) != stat
        ]
        return listed, changed, [p for p in self._files if p not in listed]

    def _look(self, paths: set[str]) -> tuple[dict[str, tuple[int, int]], list[str], list[str]]:
        """The paths events named (a directory: `dir/`): (stats, files to read, removed)."""
        listed: dict[str, tuple[int, int]] = {}
        removed: list[str] = []
        prefixes = tuple(p for p in paths if p.endswith("/"))
        if prefixes:
            paths = paths | {f for f in self._files if f.startswith(prefixes)}
        for path in sorted(paths):
            name = path.rpartition("/")[2]
            if not name.endswith(".yaml") or name.startswith("."):
                continue
            try:
                st = Path(path).stat()
            except (FileNotFoundError, NotADirectoryError):
                if path in self._files:
                    removed.append(path)
                continue
            listed[path] = (st.st_mtime_ns, st.st_size)
        return listed, list(listed), removed

    def _watcher(self) -> DirWatcher | None:
        if not self.watch:
            return None
        if not self.root.is_dir():  # nothing to watch yet: the walk finds it when it comes
            log.info("state: %s does not exist (yet): polling every %gs", self.root, self.interval)
            return None
        try:
            return DirWatcher(self.root)
        except OSError as e:
            hint = " (fs.inotify.max_user_watches)" if e.errno == errno.ENOSPC else ""
            log.warning(
                "state: cannot watch %s with inotify (%s%s): polling every %gs",
                self.root,
                e,
                hint,
                self.interval,
            )
            return None

    async def run(
        self, store: StateStore, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish a snapshot now, then one per change, until cancelled."""
        watcher = self._watcher()
        self.watching = watcher is not None
        version = store.current.version

        async def publish(
            look: tuple[dict[str, tuple[int, int]], list[str], list[str]], always: bool
        ) -> None:
            nonlocal version
            listed, changed, removed = look
            if not (changed or removed or always):
                return
            version += 1
            parsed = await trio.to_thread.run_sync(parse_files, changed)
            self._apply(listed, removed, parsed)
            errors = [f.error for f in self._files.values() if f.error]
            state = self.builder.snapshot(version, errors)
            for err in state.errors:
                log.warning("state: %s", err)
            store.update(state)

        try:
            await publish(self._scan(), always=True)
            task_status.started()
            while watcher is None:
                await trio.sleep(self.interval)
                await publish(self._scan(), always=False)
            next_walk = trio.current_time() + self.resync
            while True:
                paths: set[str] | None = set()
                with trio.move_on_at(next_walk):
                    paths = await watcher.changes(self.settle)
                if paths:
                    await publish(self._look(paths), always=False)
                    continue
                if paths is None:
                    log.warning("state: inotify's queue overflowed; reading %s again", self.root)
                if not watcher.dirs and self.root.is_dir():  # removed, then made again
                    with contextlib.suppress(OSError):
                        watcher.add_tree(str(self.root))
                await publish(self._scan(), always=False)  # the resync (or after an overflow)
                next_walk = trio.current_time() + self.resync
        finally:
            if watcher is not None:
                watcher.close()
