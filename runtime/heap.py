"""The daemons' heap: large buffers are reused instead of returned to the kernel after each use.

Every read of a proxied connection or tunnel takes a buffer of up to 256 KiB (socket `recv`,
TLS `read`) that is freed right after. With glibc's defaults the heap is trimmed as soon as
such a buffer is freed at its top (the trim threshold follows the largest freed block, here
~512 KiB), so the next read grows it again: a `brk` pair and dozens of zeroed page faults per
read. Measured on the throughput bench: ~3 `brk` calls per `recv` and a tenth of the machine
in page faults. A fixed mmap threshold above those buffers and a trim threshold of a few of
them keep that memory in the process; what is kept is bounded by the trim threshold.

That threshold only applies at the heap's top: after a load peak (thousands of connections,
an attack) the memory they freed sits in the middle of the heap and stays counted in the
daemon's RSS. `give_back_after_peaks` looks every 30 s at how much the heap holds free and,
past a few MiB, hands it to the kernel (`malloc_trim`: 2 ms for 60 MiB here, 0.1 ms when
it was given back already); the next busy read grows the heap once again, a cost paid at
most once per look.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("veil.limits")
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024  # blocks up to this size come from the heap
TRIM_THRESHOLD = 16 * 1024 * 1024  # free memory the heap keeps at its top
LOOK_EVERY = 30.0  # seconds between looks at the heap's free memory
GIVE_BACK_PAST = 8 * 1024 * 1024  # free bytes in the heap worth a malloc_trim
PAGE = os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


@dataclass
class HeapStats:
    """What give_back_after_peaks did (exported as metrics)."""

    trims: int = 0
    returned_bytes: int = 0  # the RSS drop the trims made


class HeapCollector(Collector):
    """`veil_heap_trims_total`, `veil_heap_returned_bytes_total`."""

    def __init__(self, stats: HeapStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "veil_heap_trims",
            "Trims that handed the heap's free memory back to the kernel after a load peak",
            value=self.stats.trims,
        )
        yield CounterMetricFamily(
            "veil_heap_returned_bytes",
            "Resident memory those trims gave back",
            value=self.stats.returned_bytes,
        )


def register(registry: CollectorRegistry) -> HeapStats:
    stats = HeapStats()
    registry.register(HeapCollector(stats))
    return stats


class HeapTrimmer:
    """glibc's `mallinfo2` and `malloc_trim`; `usable` is False elsewhere (musl, no glibc
    2.33), where nothing is done."""

    def __init__(self) -> None:
        libc = _libc()
        self.mallinfo2 = getattr(libc, "mallinfo2", None)
        self.malloc_trim = getattr(libc, "malloc_trim", None)
        if self.mallinfo2 is not None:
            self.mallinfo2.restype = _Mallinfo2
            self.mallinfo2.argtypes = ()
        if self.malloc_trim is not None:
            self.malloc_trim.argtypes = (ctypes.c_size_t,)
            self.malloc_trim.restype = ctypes.c_int

    @property
    def usable(self) -> bool:
        return self.mallinfo2 is not None and self.malloc_trim is not None

    def free_bytes(self) -> int:
        """Free memory the heap holds (every arena): what a trim could give back at most."""
        assert self.mallinfo2 is not None
        return int(self.mallinfo2().fordblks)

    def trim(self) -> int:
        """Give the heap's free pages back; the RSS drop it made."""
        assert self.malloc_trim is not None
        before = rss_bytes()
        self.malloc_trim(0)
        return max(0, before - rss_bytes())


async def give_back_after_peaks(stats: HeapStats, every: float = LOOK_EVERY) -> None:
    """Every `every` seconds: past GIVE_BACK_PAST free bytes in the heap, trim it."""
    heap = HeapTrimmer()
    if not heap.usable:
        log.info("the heap is not trimmed after load peaks here (no glibc malloc_trim)")
        return
    while True:
        await trio.sleep(every)
        # A trimmed chunk stays on the free lists (its pages gone): later looks trim again,
        # for ~0.1 ms, and count only when they gave something back.
        if heap.free_bytes() > GIVE_BACK_PAST and (returned := heap.trim()) > 0:
            stats.trims += 1
            stats.returned_bytes += returned
            log.debug("heap trimmed: %d KiB returned to the kernel", returned // 1024)


def keep_heap() -> bool:
    """Set glibc's thresholds; False (and nothing changed) on a libc without `mallopt`."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    if not ok:
        log.warning("could not set the heap's thresholds (mallopt refused)")
    return ok
