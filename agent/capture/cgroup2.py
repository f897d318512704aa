"""Where the cgroup v2 hierarchy is mounted: eBPF capture attaches its programs to groups in
it (and the lab keeps its pods' groups there)."""

from __future__ import annotations

from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


class CgroupError(RuntimeError):
    pass


def parse_mountinfo(text: str) -> Path | None:
    """The first cgroup2 mount point in /proc/self/mountinfo text."""
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if sep and post.split()[0] == "cgroup2":
            return Path(pre.split()[4].replace("\\040", " "))
    return None


def root() -> Path:
    mount = parse_mountinfo(MOUNTINFO.read_text())
    if mount is None:
        raise CgroupError(
            "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none "
            "/sys/fs/cgroup/unified, or boot with systemd.unified_cgroup_hierarchy)"
        )
    return mount
