"""A process's state from /proc. A process being reaped can vanish between any two reads, and
then reading its files fails with ESRCH (ProcessLookupError), not only ENOENT: both mean gone."""

from __future__ import annotations

from pathlib import Path


def parse_state(stat: str) -> str:
    """The state letter of a /proc/<pid>/stat line; the command name may hold ')' and spaces."""
    return stat.rsplit(")", 1)[1].split(maxsplit=1)[0]


def process_state(pid: int) -> str | None:
    """The state letter ('R', 'S', 'Z', ...) of a process, or None once it is gone."""
    try:
        return parse_state(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    return process_state(pid) not in (None, "Z")
