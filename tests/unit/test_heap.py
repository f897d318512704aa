"""The daemons' heap keeps its large read buffers instead of trimming after each read."""

from __future__ import annotations

import subprocess
import sys
import textwrap

READS = textwrap.dedent(
    """
    import resource, socket, sys
    if sys.argv[1] == "keep":
        from veil.runtime.heap import keep_heap
        assert keep_heap()
    a, b = socket.socketpair()
    chunk = b"x" * 65536
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(300):  # what a relay does: a 256 KiB recv, freed after use
        a.sendall(chunk)
        got = 0
        while got < len(chunk):
            got += len(b.recv(256 * 1024))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", READS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_reads_stop_faulting_in_fresh_pages_once_the_heap_is_kept():
    # glibc's defaults: the heap shrinks after every freed 256 KiB buffer and grows again,
    # about one zeroed page fault per 4 KiB read (5400 here for 300 reads).
    assert page_faults("default") > 1000
    assert page_faults("keep") < 200


PEAK = textwrap.dedent(
    """
    import trio
    from veil.runtime import heap
    heap.keep_heap()
    held = [bytearray(3000) for _ in range(20000)]  # a peak: ~60 MiB of connection buffers
    keep = held[::200]  # a few outlive it, spread over the heap (its top is not free)
    del held
    before = heap.rss_bytes()
    stats = heap.HeapStats()

    async def main():
        with trio.move_on_after(0.5):
            await heap.give_back_after_peaks(stats, 0.1)

    trio.run(main)
    print(before, heap.rss_bytes(), stats.trims, stats.returned_bytes, heap.HeapTrimmer().trim())
    """
)


def test_a_peak_s_memory_is_given_back_to_the_kernel():
    """The memory a load peak freed in the middle of the heap (not at its top, so glibc's
    trim threshold never returns it) is handed back at the next look, and counted."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK], capture_output=True, text=True, check=True
    ).stdout.split()
    before, after, trims, returned, again = map(int, out)
    assert before - after > 40 * 2**20, out
    assert trims >= 1 and returned > 40 * 2**20, out
    assert again < 2**20  # the next looks find it given back already
