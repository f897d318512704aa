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


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        sys.exit("usage: python -m veil.lab.mounts SPEC.json -- COMMAND...")
    with open(args[0], encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("cgroup"):
        with open(f"{spec['cgroup']}/cgroup.procs", "w", encoding="ascii") as f:
            f.write("0\n")
    for m in spec["mounts"]:
        subprocess.run(["mount", "--bind", m["source"], m["target"]], check=True)
        if m.get("readOnly"):
            subprocess.run(["mount", "-o", "remount,bind,ro", m["target"]], check=True)
    command = args[2:]
    try:
        os.execvp(command[0], command)
    except OSError as e:
        sys.exit(f"veil lab: cannot run {command[0]!r}: {e}")


if __name__ == "__main__":
    main()
