"""Reading the daemons' access logs in tests: lines arrive up to 0.1 s after the traffic."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Entry = dict[str, Any]


def access_entries(path: Path) -> list[Entry]:
    if not path.exists():
        return []
    return [
        json.loads(line.split("veil.access: ", 1)[1])
        for line in path.read_text().splitlines()
        if "veil.access: " in line
    ]


def wait_for_access(
    path: Path, until: Callable[[list[Entry]], bool], timeout: float = 3.0
) -> list[Entry]:
    """The access log's entries once `until(entries)` holds; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        entries = access_entries(path)
        if until(entries):
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"access log {path}: condition not met after {timeout:g}s")
        time.sleep(0.05)
