"""A process's state from /proc, read while the process may be reaped at any moment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from veil.lab import procfs


def test_the_state_letter_follows_the_last_parenthesis() -> None:
    assert procfs.parse_state("42 (a) b (c)) S 1 42 42 0") == "S"


def test_a_running_process_and_one_that_is_gone() -> None:
    assert procfs.running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert procfs.process_state(child.pid) is None
    assert not procfs.running(child.pid)


def test_a_zombie_is_not_running() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        assert procfs.process_state(child.pid) == "Z"
        assert not procfs.running(child.pid)
    finally:
        child.wait()


def test_a_process_reaped_while_its_stat_is_read_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading /proc/<pid>/stat of a process being reaped fails with ESRCH, not ENOENT (a
    clean-clone CI run failed so in the lab's `stop_agent`)."""

    def vanished(self: Path, *args: object, **kwargs: object) -> str:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(Path, "read_text", vanished)
    assert procfs.process_state(os.getpid()) is None
    assert not procfs.running(os.getpid())
