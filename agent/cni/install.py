"""Puts veil-cni on the node, from the agent's pod: the shim into the host's CNI bin dir, and
Veil chained into the primary CNI's configuration list, kept there.

Container runtimes use the first file (by name) of the CNI config dir with a .conflist, .conf
or .json extension: the primary CNI's (Calico, Flannel, Cilium, the lab's ptp). Veil appends
its plugin to that list, so every pod's network is set up by the primary first, then
veil-cni enrolls it. Primary CNIs rewrite their file (on upgrade, on restart): the installer
watches the dir and puts Veil back within `POLL` seconds (the agent also enrolls running pods
it finds uncaptured, docs/install.md). On uninstall it removes its entry (and the shim): the
node is as the primary CNI left it. Deciding is pure (`chained`, `unchained`); `Installer` is
the file I/O.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("veil.cni.install")
PLUGIN_TYPE = "veil-cni"
EXTENSIONS = (".conflist", ".conf", ".json")
POLL = 0.5


def primary(names: list[str]) -> str | None:
    """The file a runtime uses: the first config file by name (as libcni's ConfFiles)."""
    files = sorted(n for n in names if n.endswith(EXTENSIONS) and not n.startswith("."))
    return files[0] if files else None


def as_list(doc: dict[str, Any]) -> dict[str, Any]:
    """A single-plugin .conf as a configuration list (as libcni's ConfListFromConf)."""
    if isinstance(doc.get("plugins"), list):
        return doc
    plugin = {k: v for k, v in doc.items() if k not in ("cniVersion", "name")}
    return {
        "cniVersion": doc.get("cniVersion", "1.0.0"),
        "name": doc.get("name", ""),
        "plugins": [plugin],
    }


def chained(doc: dict[str, Any], plugin: dict[str, Any]) -> dict[str, Any] | None:
    """The list with Veil's plugin last (exactly once, as given); None if already so."""
    doc = as_list(doc)
    plugins = [
        p for p in doc["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)
    ]
    wanted = [*plugins, plugin]
    if doc["plugins"] == wanted:
        return None
    return {**doc, "plugins": wanted}


def unchained(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The list without Veil's plugin; None if it had none."""
    if not isinstance(doc.get("plugins"), list):
        return None
    plugins = [
        p for p in doc["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)
    ]
    if len(plugins) == len(doc["plugins"]):
        return None
    return {**doc, "plugins": plugins}


class InstallError(RuntimeError):
    pass


@dataclass
class Installer:
    shim: Path  # the built shim (in the agent's image)
    bin_dir: Path  # the host's CNI bin dir, as mounted in the agent's pod
    conf_dir: Path  # the host's CNI config dir, likewise
    plugin: dict[str, Any]  # Veil's entry: type, agentSocket (a host path), excludeNamespaces
    _seen: tuple[Any, ...] = field(default=(), repr=False)

    def install_binary(self) -> None:
        """Copy the shim in with a rename: a runtime executing the old one is not disturbed."""
        if not self.shim.is_file():
            raise InstallError(f"the veil-cni shim {self.shim} is missing from this image")
        target = self.bin_dir / PLUGIN_TYPE
        tmp = self.bin_dir / f".{PLUGIN_TYPE}.tmp"
        shutil.copyfile(self.shim, tmp)
        tmp.chmod(0o755)
        tmp.replace(target)

    def _write(self, path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.veil-tmp")  # no config extension: never read
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)

    def ensure(self) -> bool:
        """Veil chained into the primary's list; True if the file was (re)written."""
        name = primary([p.name for p in self.conf_dir.iterdir()])
        if name is None:
            return False  # no primary CNI yet: no pod can start; we look again
        path = self.conf_dir / name
        try:
            before = path.stat()
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("CNI config %s unreadable (%s); retrying", path, e)
            return False
        if not isinstance(doc, dict):
            log.warning("CNI config %s is not a JSON object; leaving it alone", path)
            return False
        new = chained(doc, self.plugin)
        if new is None:
            return False
        with contextlib.suppress(OSError):
            now = path.stat()
            if (now.st_ino, now.st_mtime_ns, now.st_size) != (
                before.st_ino,
                before.st_mtime_ns,
                before.st_size,
            ):
                return False  # the primary is writing it right now: the next look sees it
        if name.endswith(".conf"):  # a single-plugin file becomes a list next to it
            target = path.with_suffix(".conflist")
            self._write(target, new)
            path.unlink()
            log.info("veil-cni chained into %s (converted from %s)", target, path.name)
        else:
            self._write(path, new)
            log.info("veil-cni chained into %s", path)
        return True

    def _state(self) -> tuple[Any, ...]:
        """Cheap change detector: the dir's entries with their size and mtime."""
        out = []
        with os.scandir(self.conf_dir) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    st = e.stat()
                    out.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Install, then keep Veil chained: the primary CNI may rewrite its file any time."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(self.install_binary)
        self.ensure()
        self._seen = self._state()
        task_status.started()
        while True:
            await trio.sleep(POLL)
            state = self._state()
            if state != self._seen:
                if self.ensure():
                    log.warning("the primary CNI rewrote its configuration: veil-cni chained again")
                self._seen = self._state()

    def uninstall(self) -> None:
        """Veil out of every config list in the dir, the shim removed."""
        for name in sorted(p.name for p in self.conf_dir.iterdir()):
            if not name.endswith(EXTENSIONS) or name.startswith("."):
                continue
            path = self.conf_dir / name
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            new = unchained(doc) if isinstance(doc, dict) else None
            if new is not None:
                self._write(path, new)
                log.info("veil-cni removed from %s", path)
        (self.bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)
