"""Finding a running pod's network namespace and cgroup on the node, for pods the agent must
capture after they started (their namespace labelled later, or an agent that was away):
CNI ADD hands new pods over directly, but nothing hands over a running one.

As Istio's node agent does, the pod is found by its UID in the cgroup of its processes:
the kubelet names a pod's cgroup `pod<uid>` (cgroupfs driver) or
`kubepods-<qos>-pod<uid with _>.slice` (systemd driver), and so does the lab's kubelet. The
netns is then named by a persistent path when one exists (the runtime's bind mount under
/run/netns, found by inode), else by the process's /proc/<pid>/ns/net.

The lab's manifest mode annotates its pods with both paths instead (`lab.veil.dev/netns`,
`lab.veil.dev/cgroup`); the annotation wins where it is present.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
POD_CGROUP = re.compile(rf"pod({_UID})(?:\.slice)?(?=/|$)")


@dataclass(frozen=True)
class PodLocation:
    netns: str  # a path to the pod's netns
    cgroup: str  # the pod's cgroup v2 directory


def pod_of_cgroup(path: str) -> tuple[str, str] | None:
    """(pod uid, the pod-level group) of a process's cgroup v2 path, if it is a pod's. Pure."""
    m = POD_CGROUP.search(path)
    if not m:
        return None
    return m.group(1).replace("_", "-"), path[: m.end()]


def _netns_path(pid: int, netns_dir: Path) -> str:
    own = f"/proc/{pid}/ns/net"
    st = Path(own).stat()
    try:
        for entry in os.scandir(netns_dir):
            with contextlib.suppress(OSError):
                named = Path(entry.path).stat()
                if (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
                    return entry.path
    except FileNotFoundError:
        pass
    return own


def scan(
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    netns_dir: Path = Path("/run/netns"),
) -> dict[str, PodLocation]:
    """Every pod with a process on this machine, by uid."""
    found: dict[str, int] = {}
    groups: dict[str, str] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "cgroup").read_text()
        except OSError:
            continue  # ended meanwhile
        for line in text.splitlines():
            if line.startswith("0::") and (pod := pod_of_cgroup(line[3:])):
                uid, group = pod
                found.setdefault(uid, int(entry.name))
                groups.setdefault(uid, group)
    out = {}
    for uid, pid in found.items():
        try:
            netns = _netns_path(pid, netns_dir)
        except OSError:
            continue
        out[uid] = PodLocation(netns, str(cgroup_root) + groups[uid])
    return out
