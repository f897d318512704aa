"""The daemons' heap: large buffers are reused instead of returned to the kernel after each use.

Every read of a proxied connection or tunnel takes a buffer of up to 256 KiB (socket `recv`,
TLS `read`) that is freed right after. With glibc's defaults the heap is trimmed as soon as
such a buffer is freed at its top (the trim threshold follows the largest freed block, here
~512 KiB), so the next read grows it again: a `brk` pair and dozens of zeroed page faults per
read. Measured on the throughput bench: ~3 `brk` calls per `recv` and a tenth of the machine
in page faults. A fixed mmap threshold above those buffers and a trim threshold of a few of
them keep that memory in the process; what is kept is bounded by the trim threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("veil.limits")
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024  # blocks up to this size come from the heap
TRIM_THRESHOLD = 16 * 1024 * 1024  # free memory the heap keeps at its top


def keep_heap() -> bool:
    """Set glibc's thresholds; False (and nothing changed) on a libc without `mallopt`."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    if not ok:
        log.warning("could not set the heap's thresholds (mallopt refused)")
    return ok
