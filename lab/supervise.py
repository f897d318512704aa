"""The kubelet's `restartPolicy: Always` for the lab's daemons (CA, agents, waypoints).

    python -m veil.lab.supervise STATE_FILE -- COMMAND...

Runs COMMAND; whenever it exits (crash, kill -9, or a clean exit it was not asked for) it is
started again after a back-off that doubles from 1 s to 30 s (reset once a run lasted 60 s),
as the kubelet does (its back-off starts at 10 s; a lab wants its daemons back sooner).
STATE_FILE (JSON) says the current pid, how many restarts there were and why the last run
ended: `veil lab status` shows it. SIGTERM or SIGINT is passed to the command, and the
supervisor then exits with it instead of restarting it (how `veil lab agent stop` and
`lab down` stop a daemon on purpose).
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
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts, backoff, last = 0, FIRST_BACKOFF, ""
    while True:
        started = time.monotonic()
        child = subprocess.Popen(argv)
        _write_state(
            state,
            {"pid": child.pid, "supervisor": os.getpid(), "restarts": restarts, "lastExit": last},
        )
        code = child.wait()
        if stopping:
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
