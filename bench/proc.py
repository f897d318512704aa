"""What the lab benchmarks share: the veil command, and a process's RSS and CPU from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VEIL = str(Path(sys.executable).parent / "veil")
TICKS = os.sysconf("SC_CLK_TCK")


def veil(*args: str, check: bool = True, timeout: float = 1800) -> str:
    return subprocess.run(
        [VEIL, *args], check=check, capture_output=True, text=True, timeout=timeout
    ).stdout


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS
