"""What the benchmarks share: the veil command, a process's RSS and CPU from /proc, and the
VM speed probe."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

VEIL = str(Path(sys.executable).parent / "veil")
TICKS = os.sysconf("SC_CLK_TCK")


def speed_probe(clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for a fixed pure-Python loop: how fast the VM runs right now (its speed drifts
    by up to 2x within minutes; a round's numbers are read against it). ~0.08 s when fast."""
    start = clock()
    x = 0
    for i in range(3_000_000):
        x += i
    return clock() - start


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


class RssPeak:
    """The summed RSS of `pids` (MB) when entered, and the most it reached inside (sampled
    every 0.2 s in a thread): a proxy's memory at rest and under a load."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.rest = self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def mb(self) -> float:
        return sum(rss_kb(p) for p in self.pids) / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.mb())

    def __enter__(self) -> RssPeak:
        self.rest = self.peak = self.mb()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.mb())
