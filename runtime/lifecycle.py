"""How a Veil daemon runs: everything in one nursery, stopped cleanly by SIGTERM or SIGINT.

The signal receiver is installed before anything starts, so a signal that arrives while the
daemon is still starting is queued and handled, never fatal.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("veil")


def configure_logging(level: str) -> None:
    """Every daemon's log format, on stderr."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The format shows neither caller, thread nor process: don't collect them for every
    # record (the logging docs' own advice; an access log line is written per connection).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


async def run_until_signalled(
    name: str,
    start: Callable[[trio.Nursery], Awaitable[None]],
    graceful: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run `start(nursery)` (it starts the daemon's tasks), then wait for a stop signal.
    With `graceful`, SIGTERM first awaits it (the daemon winds down: the agent hands over and
    drains) and SIGINT, or a second signal, stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await start(nursery)
            async for signum in signals:
                how = signal.Signals(signum).name
                if graceful is not None and signum == signal.SIGTERM:
                    log.info("%s: stopping gracefully on %s", name, how)
                    nursery.start_soon(_wind_down, graceful, nursery.cancel_scope)
                    graceful = None  # the next signal stops at once
                    continue
                log.info("%s: stopping on %s", name, how)
                nursery.cancel_scope.cancel()
                break


async def _wind_down(graceful: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await graceful()
    scope.cancel()
