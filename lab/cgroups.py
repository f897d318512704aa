"""cgroup v2 groups for lab pods and nodes.

Every process the lab starts lives in a group under `<cgroup2 mount>/veil/<lab>/`, so
`lab down` can kill all of them at once with `cgroup.kill`, even after `lab up` itself was
killed, and so the eBPF capture mode can attach per-pod cgroup programs later.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from veil.agent.capture.cgroup2 import MOUNTINFO, CgroupError, parse_mountinfo, root

__all__ = [  # the mount lookup lives with eBPF capture, which the product needs without the lab
    "MOUNTINFO",
    "CgroupError",
    "create",
    "join",
    "kill_and_remove",
    "lab_group",
    "parse_mountinfo",
    "procs",
    "root",
]


def lab_group(lab: str) -> Path:
    return root() / "veil" / lab


def create(group: Path) -> Path:
    group.mkdir(parents=True, exist_ok=True)
    return group


def join(group: Path, pid: int = 0) -> None:
    """Move a process (default: the caller) into the group."""
    (group / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def procs(group: Path) -> list[int]:
    out: list[int] = []
    if not group.exists():
        return out
    for g in [group, *sorted(p for p in group.rglob("*") if p.is_dir())]:
        try:
            out += [int(x) for x in (g / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def kill_and_remove(group: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in the group tree, wait until it is empty, remove the tree."""
    if not group.exists():
        return
    kill_file = group / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1\n")
    else:  # kernels before 5.14
        for pid in procs(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    deadline = time.monotonic() + timeout
    while procs(group):
        _reap_children()
        if time.monotonic() > deadline:
            raise CgroupError(f"processes {procs(group)} in {group} did not exit after SIGKILL")
        time.sleep(0.02)
    children = sorted(
        (p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    )
    for g in [*children, group]:
        _rmdir(g, deadline)


def _reap_children() -> None:
    """Reap exited children of ours: a zombie keeps its cgroup busy (rmdir: EBUSY)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _rmdir(group: Path, deadline: float) -> None:
    while True:
        try:
            group.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(
                    f"cannot remove {group}: {e.strerror} (processes still exiting: {procs(group)})"
                ) from None
            _reap_children()
            time.sleep(0.02)
