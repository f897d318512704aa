"""CPU per GB of one HBONE stream, both ends in this process: the TLS and framing code alone.

    .venv/bin/python bench/tls_stream.py [--gb 2] [--rounds 5]

A client HboneIO sends `--gb` of 256 KiB writes on one CONNECT stream over TCP loopback
(TLS 1.3, mesh certificates from an in-process CA) to a server HboneIO whose handler reads
and drops them. No lab, no root, no capture, no app sockets: what it measures is the cost
per byte of `runtime/hbone/io.py` and OpenSSL, the part of `bench/hbone.py`'s CPU-s/GB that
is Veil's own. For an A/B of two commits, run it from each tree (`git worktree add`) in
turns: the VM's speed drifts (2x within minutes), so compare interleaved rounds, never two
blocks, and read the CPU per GB in units of the speed probe timed before each round (the
seconds of a fixed pure-Python loop, as in bench/hbone.py): a slower stretch stretches both.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.hbone import hbone_pair, loopback_pair, sink  # noqa: E402

from bench.proc import speed_probe  # noqa: E402

CHUNK = 256 * 1024


async def one_round(total: int) -> tuple[float, float]:
    """(CPU seconds per GB, Gbit/s) of moving `total` bytes through one stream."""
    received = 0
    done = trio.Event()

    def got(data: bytes | memoryview) -> None:
        nonlocal received
        received += len(data)

    server_sock, client_sock = loopback_pair()
    payload = bytes(range(256)) * (CHUNK // 256)
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            client, _server = await hbone_pair(
                Path(tmp), nursery, sink(got, done), socks=(server_sock, client_sock)
            )
            stream = await client.open_stream("10.0.0.1:80", [])
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(total // CHUNK):
                await stream.send(payload)
            await stream.send_eof()
            await done.wait()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            nursery.cancel_scope.cancel()
    return cpu / (received / 1e9), received * 8 / wall / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0, help="bytes per round, in GB")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    total = int(args.gb * 1e9) // CHUNK * CHUNK
    cpus, relative = [], []
    for i in range(args.rounds):
        probe = speed_probe(time.process_time)
        cpu, gbit = trio.run(one_round, total)
        cpus.append(cpu)
        relative.append(cpu / probe)
        print(
            f"round {i + 1}: {cpu:.3f} CPU-s/GB, {gbit:.2f} Gbit/s, probe {probe:.3f} s: "
            f"{cpu / probe:.1f} probes per GB",
            flush=True,
        )
    print(
        f"median: {statistics.median(cpus):.3f} CPU-s/GB, "
        f"{statistics.median(relative):.1f} probes per GB (both ends, one process)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
