"""How a Veil daemon runs: everything in one nursery, stopped cleanly by SIGTERM or SIGINT.

The signal receiver is installed before anything starts, so a signal that arrives while the
daemon is still starting is queued and handled, never fatal.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("veil")


async def run_until_signalled(name: str, start: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run `start(nursery)` (it starts the daemon's tasks), then wait for a stop signal."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await start(nursery)
            async for signum in signals:
                log.info("%s: stopping on %s", name, signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
