"""The kubelet's `restartPolicy: Always` for the lab's daemons (CA, agents, waypoints).

    python -m veil.lab.supervise STATE_FILE -- COMMAND...

Runs COMMAND; whenever it exits (crash, kill -9, or a clean exit it was not asked for) it is
started again after a back-off that doubles from 1 s to 30 s (reset once a run lasted 60 s),
as the kubelet does (its back-off starts at 10 s; a lab wants its daemons back sooner).
STATE_FILE (JSON) says the current pid, how many restarts there were and why the last run
ended: `veil lab status` shows it. SIGTERM or SIGINT stops the command at once (SIGINT), and
the supervisor then exits with it instead of restarting it (how `veil lab agent stop` and
`lab down` stop a daemon on purpose).

SIGHUP from the command (it finds the supervisor in $VEIL_SUPERVISOR_PID) asks for its
successor now: the agent does so on SIGTERM (`kill -TERM`), and the new one takes the old
one's listeners over while the old one drains, as a DaemonSet's `maxSurge` update does. The
old one is then left to exit by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FIRST_BACKOFF, MAX_BACKOFF, STEADY = 1.0, 30.0, 60.0


def read_state(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_state(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def supervise(state: Path, argv: list[str]) -> int:
    stopping = False
    successor_wanted = False
    child: subprocess.Popen[bytes] | None = None
    draining: list[subprocess.Popen[bytes]] = []  # predecessors finishing after a hand-over

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in [child, *draining]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)  # on purpose: at once, no hand-over

    def successor(_signum: int, _frame: object) -> None:
        nonlocal successor_wanted
        successor_wanted = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, successor)
    env = {**os.environ, "VEIL_SUPERVISOR_PID": str(os.getpid())}
    restarts, handovers, backoff, last = 0, 0, FIRST_BACKOFF, ""

    def launch() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=env)
        _write_state(
            state,
            {
                "pid": p.pid,
                "supervisor": os.getpid(),
                "restarts": restarts,
                "handovers": handovers,
                "lastExit": last,
            },
        )
        return p

    while True:
        started = time.monotonic()
        child = launch()
        while (code := child.poll()) is None:
            if successor_wanted and not stopping:
                # The daemon was asked to stop (SIGTERM) and hands over: its successor runs
                # beside it and takes its listeners; it exits once drained, not restarted.
                successor_wanted = False
                handovers += 1
                draining.append(child)
                child = launch()
                started = time.monotonic()
            draining = [p for p in draining if p.poll() is None]
            time.sleep(0.05)
        if stopping:
            for p in draining:
                p.wait()
            return code
        ran = time.monotonic() - started
        if ran >= STEADY:
            backoff = FIRST_BACKOFF
        last = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        print(
            f"veil-supervise: {argv[0]} ({' '.join(argv[1:3])}) ended ({last}) after {ran:.1f}s;"
            f" restarting in {backoff:g}s (restart {restarts + 1})",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        if stopping:
            return code
        backoff = min(backoff * 2, MAX_BACKOFF)
        restarts += 1


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        sys.exit("usage: python -m veil.lab.supervise STATE_FILE -- COMMAND...")
    sys.exit(supervise(Path(args[0]), args[2:]))


if __name__ == "__main__":
    main()
