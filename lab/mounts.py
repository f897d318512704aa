"""A container's filesystem view in the lab: run as

    nsenter --net=<netns> -- unshare --mount --propagation slave -- \\
        python -m veil.lab.mounts SPEC.json -- COMMAND...

it joins the pod's cgroup (SPEC's `cgroup`: done here, not between fork and exec, because
the kubelet that spawns it has threads), bind-mounts each `{"source", "target", "readOnly"}`
of SPEC's `mounts` (the pod's volumes, its /etc/hosts and /etc/resolv.conf) inside the
private mount namespace `unshare` made, then execs the command. The host never sees these
mounts; the kubelet creates a missing target (an empty file or directory) beforehand, and
`lab down` removes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        sys.exit("usage: python -m veil.lab.mounts SPEC.json -- COMMAND...")
    with open(args[0], encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("cgroup"):
        with open(f"{spec['cgroup']}/cgroup.procs", "w", encoding="ascii") as f:
            f.write("0\n")
    # Every source is opened before anything is mounted: a mount may hide where a later
    # source lives (the node's /var/run/veil mounted over the lab's /run/veil/lab/...).
    plan = [
        (
            m,
            os.open(m["source"], os.O_PATH),
            Path(m["source"]).is_dir(),
            Path(m["source"]).resolve() == Path(m["target"]).resolve(),
        )
        for m in spec["mounts"]
    ]
    sources = [fd for _m, fd, _d, _s in plan]
    for m, fd, is_dir, same in plan:
        target = Path(m["target"])
        if same:
            continue  # the machine's own path at its own place (/proc, /run/netns): as it is
        if not os.path.lexists(target):  # inside an earlier mount (the kubelet made the rest)
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
        source = f"/proc/self/fd/{fd}"  # the mount command inherits the descriptor
        subprocess.run(["mount", "--bind", source, str(target)], check=True, pass_fds=(fd,))
        if m.get("readOnly"):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    for fd in sources:
        os.close(fd)
    command = args[2:]
    try:
        os.execvp(command[0], command)
    except OSError as e:
        sys.exit(f"veil lab: cannot run {command[0]!r}: {e}")


if __name__ == "__main__":
    main()
