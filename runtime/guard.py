"""The barrier between one connection's failure and the daemon that serves it.

Every per-connection and per-stream task of every Veil daemon (agent, CA, waypoint, the lab's
echo server) runs behind `guarded`: an exception it did not handle is logged with its
traceback, counted in `veil_handler_errors_total{handler}`, and ends that task only. Without
it, trio would cancel the task's siblings and, through the nursery, take the daemon down: one
pod's malformed bytes must never stop traffic for the others.

Only `Exception` is caught. Cancellation (trio.Cancelled is a BaseException), KeyboardInterrupt
and SystemExit pass through: they are how a daemon stops on purpose.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("veil.guard")

# Process-wide: one process is one daemon, and the count is what an operator alerts on.
ERRORS: Counter[str] = Counter()


async def guarded(
    handler: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    cleanup: Callable[[], None] | None = None,
) -> None:
    """Run `fn(*args)`; an exception escaping it is logged and counted, never re-raised, and
    `cleanup` closes what the task held (its connection or stream)."""
    try:
        await fn(*args)
    except Exception:
        caught(handler)
        if cleanup is not None:
            try:
                cleanup()
            except Exception:
                log.exception("%s: cleanup after a failure failed too", handler)


def caught(handler: str) -> None:
    """Count and log the exception being handled (call from an `except` block)."""
    ERRORS[handler] += 1
    log.exception("%s failed (a bug; the connection is closed, serving goes on)", handler)


class GuardCollector(Collector):
    """`veil_handler_errors_total`: tasks ended by an exception the barrier caught."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "veil_handler_errors",
            "Per-connection tasks ended by an unhandled exception (the daemon kept serving)",
            labels=["handler"],
        )
        for handler, n in sorted(ERRORS.items()):
            family.add_metric([handler], n)
        yield family


def register(registry: CollectorRegistry) -> None:
    registry.register(GuardCollector())
