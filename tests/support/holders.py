"""Pieces of traffic and policy that several lab suites use."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.lab import VEIL, veil

# A keep-alive connection to port 8080 that got its answer, then held: prints "open", then how
# it ended ("eof" or "reset").
HOLD_OPEN = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=15)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
got = b""
while b"\\r\\n\\r\\n" not in got:
    got += s.recv(65536)
print("open", flush=True)
try:
    while s.recv(65536):
        pass
    print("eof", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""

# A connection to port 8080 that sends nothing: prints "open", then how it ended and after how
# long ("ended 1.2", "reset 0.4", "data ..."), or "still open" after 15 s.
HOLD_IDLE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
print("open", flush=True)
s.settimeout(15)
started = time.monotonic()
try:
    got = s.recv(1)
    print("ended" if got == b"" else "data", round(time.monotonic() - started, 1), flush=True)
except ConnectionResetError:
    print("reset", round(time.monotonic() - started, 1), flush=True)
except TimeoutError:
    print("still open", flush=True)
"""


@contextmanager
def holding(lab: str, script: str, ip: str) -> Iterator[subprocess.Popen[str]]:
    """`script` (HOLD_OPEN or HOLD_IDLE) run by pod `client` of namespace `mesh` against `ip`,
    once it printed "open"; read how its connection ended from its stdout. Killed on the way
    out if it still runs."""
    command = [VEIL, "lab", "exec", "--name", lab, "-n", "mesh", "client", "--", "python3"]
    proc = subprocess.Popen(
        [*command, "-c", script, ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def ended(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    """The first word of how a holder's connection ended ("reset", "eof", "ended", ...)."""
    out, _ = proc.communicate(timeout=timeout)
    return out.split()[0] if out.split() else ""


def apply(lab: str, tmp: Path, doc: str) -> None:
    (tmp / "policy.yaml").write_text(doc)
    veil("lab", "apply", "--name", lab, "-f", str(tmp / "policy.yaml"))
    time.sleep(1.0)  # the agents see it within one 200 ms poll; give them margin


POLICY = """apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {{name: server-policy, namespace: mesh}}
spec:
{spec}
"""

DENY_CLIENT = POLICY.format(
    spec="""  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]"""
)
