"""Who runs the enrolled pods' proxies: this process (`InProcess`, one worker) or worker
processes (`veil.agent.workers.WorkerPool`). Enrollment decides which pods are served;
a `PodServing` serves them and answers for what they hold (tunnels, live connections)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Protocol

import trio

from veil.agent.proxy.pod import PodProxy, ProxyContext
from veil.core.state import Workload


class PodServing(Protocol):
    async def start(
        self,
        nursery: trio.Nursery,
        w: Workload,
        netns: str,
        ip: str,
        listeners: Sequence[socket.socket],
    ) -> None:
        """Serve the pod's listeners (handed over, or opened here when none); OSError if
        they cannot be served. Cancelled with `nursery` at the latest."""

    def stop(self, key: str) -> None:
        """Stop serving a pod: its listeners and connections close."""

    def listeners(self, key: str) -> list[socket.socket]:
        """The pod's listening sockets (what a hand-over passes on)."""

    def hand_over(self, nursery: trio.Nursery) -> None:
        """A successor accepts now: stop accepting, finish what is in hand."""

    def reevaluate(self) -> int:
        """Judge live inbound connections again (policies changed); how many were cut."""

    def tunnels(self) -> tuple[int, int]:
        """Open HBONE connections (outbound pooled, inbound)."""

    def active(self) -> int:
        """Connections being handled."""

    def handled(self) -> int:
        """Connections accepted since the serving processes started."""

    async def refresh(self, metrics: bool = True) -> None:
        """Bring what `tunnels()` and `active()` say up to date (and the metrics, unless
        `metrics` is False)."""


class InProcess:
    """Every pod's proxy in this process's trio loop."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.proxies: dict[str, PodProxy] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self.handled_before = 0  # by proxies of pods since stopped

    async def start(
        self,
        nursery: trio.Nursery,
        w: Workload,
        netns: str,
        ip: str,
        listeners: Sequence[socket.socket],
    ) -> None:
        scope = trio.CancelScope()
        proxy = PodProxy(self.ctx, w, netns, ip, listeners)

        async def run_proxy(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await proxy.run(task_status=task_status)

        await nursery.start(run_proxy)
        self.proxies[w.key] = proxy
        self._scopes[w.key] = scope

    def stop(self, key: str) -> None:
        if (proxy := self.proxies.pop(key, None)) is not None:
            self.handled_before += proxy.handled
        if (scope := self._scopes.pop(key, None)) is not None:
            scope.cancel()

    def listeners(self, key: str) -> list[socket.socket]:
        return self.proxies[key].listeners

    def hand_over(self, nursery: trio.Nursery) -> None:
        for proxy in self.proxies.values():
            nursery.start_soon(proxy.hand_over)

    def reevaluate(self) -> int:
        return sum(proxy.reevaluate() for proxy in self.proxies.values())

    def tunnels(self) -> tuple[int, int]:
        out = sum(len(p.pod.pool.connections()) for p in self.proxies.values() if p.pod.pool)
        return out, sum(p.inbound_tunnels for p in self.proxies.values())

    def active(self) -> int:
        return sum(p.active for p in self.proxies.values())

    def handled(self) -> int:
        """Connections accepted since this process started."""
        return self.handled_before + sum(p.handled for p in self.proxies.values())

    async def refresh(self, metrics: bool = True) -> None:
        return None
