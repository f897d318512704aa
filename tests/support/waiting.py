"""Waiting in unit tests without sleeping for a guessed time: check again each time every task
is blocked (trio's `wait_all_tasks_blocked`), so a test waits exactly as long as the code
under test needs, and fails after `timeout` if the condition never comes."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0)  # a timer or I/O of the code under test may be due
