"""The daemons raise their open-files soft limit to the hard limit (one descriptor per proxied
connection: a soft limit of 1024 would cap a node at about a thousand connections)."""

from __future__ import annotations

import resource
import subprocess
import sys

RUN = """
import logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from veil.runtime.fdlimit import raise_open_files
print(raise_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def run_with(soft: int, hard: int) -> list[str]:
    """A fresh process with these limits calls raise_open_files(): its log and result."""
    return subprocess.run(
        [sys.executable, "-c", RUN, str(soft), str(hard)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 8192)
    assert run_with(256, hard)[-1] == f"{hard} {hard}"


def test_a_low_hard_limit_is_kept_and_reported() -> None:
    lines = run_with(300, 300)
    assert lines[-1] == "300 300"
    assert "open files limit is only 300" in lines[0]
