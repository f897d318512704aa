"""The daemons' open-files limit: raised from the soft to the hard limit at start.

Every proxied connection holds a descriptor on each agent it crosses (the app's socket), plus
the tunnels, listeners and files. Distributions start processes with a soft limit of 1024
(systemd's default, kept for `select()`), which would cap a node at about a thousand open
connections, after which accepts fail with EMFILE and new connections wait in the backlog.
Raising the soft limit up to the hard one is what a process may do on its own; where the hard
limit is unlimited, the kernel's cap on a process's descriptors (`fs.nr_open`) is the target.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger("veil.limits")
NR_OPEN = Path("/proc/sys/fs/nr_open")
LOW = 4096  # below this, say so in the log


def raise_open_files() -> int:
    """Raise RLIMIT_NOFILE's soft limit as far as allowed; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("open files limit stays at %d (hard limit %d): %s", soft, hard, e)
    if soft != resource.RLIM_INFINITY and soft < LOW:
        log.warning(
            "open files limit is only %d: each open proxied connection takes one; "
            "raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)",
            soft,
        )
    return soft
