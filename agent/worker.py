"""An agent's worker process (`veil agent --workers N`): serves the pods' listeners that its
control process hands it, with the state and certificates the control process sends.

Each worker has its own trio loop, tunnel pools and metrics; all workers accept from the
same listening sockets (one accept queue per listener, shared: the kernel gives each
connection to one of them). The worker never watches the cluster, installs capture or talks
to the CA: what it knows comes over its channel (`veil.agent.workerwire`). It exits when
the channel closes (its control process stopped or died), and with it every connection it
held; the listeners stay open in the control process and its other workers.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence

import trio
from prometheus_client import CollectorRegistry

from veil.agent.proxy.context import ProxyContext, denied_counter
from veil.agent.serving import InProcess
from veil.agent.workerchannel import Channel
from veil.agent.workerwire import (
    Ask,
    Done,
    HandOver,
    Serve,
    SetCredentials,
    SetState,
    Stats,
    Stop,
    Want,
    WireError,
)
from veil.core import admission
from veil.core.spiffe import SpiffeId
from veil.runtime import guard, heap
from veil.runtime.fdlimit import raise_open_files
from veil.runtime.identity.copies import CertificateCopies
from veil.runtime.lifecycle import configure_logging
from veil.runtime.store import StateStore
from veil.runtime.telemetry.accesslog import AccessLog
from veil.runtime.telemetry.metrics import TcpMetrics

log = logging.getLogger("veil.worker")


class Worker:
    def __init__(self, index: int, node: str, trust_domain: str, sock: socket.socket) -> None:
        self.index = index
        self.channel = Channel(sock)
        self.registry = CollectorRegistry()
        self.access_log = AccessLog()
        self.store = StateStore()
        self.certs = CertificateCopies(want=self._want)
        self.ctx = ProxyContext(
            node=node,
            trust_domain=trust_domain,
            store=self.store,
            certs=self.certs,
            metrics=TcpMetrics(self.registry, self.access_log),
            denied=denied_counter(self.registry),
        )
        guard.register(self.registry)
        self.heap = heap.register(self.registry)
        admission.register(self.ctx.admission, self.registry)
        self.serving = InProcess(self.ctx)
        self._nursery: trio.Nursery | None = None

    def _want(self, sid: SpiffeId) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send, Want(sid))

    async def _send(self, msg: object) -> None:
        try:
            await self.channel.send(msg)
        except OSError as e:  # the agent is gone: the read loop ends us
            log.debug("worker %d: %s not sent: %s", self.index, type(msg).__name__, e)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.access_log.run)
            nursery.start_soon(heap.give_back_after_peaks, self.heap)
            try:
                while (msg := await self.channel.receive()) is not None:
                    await self.on(msg, nursery)
            except (WireError, OSError) as e:
                log.error("worker %d: channel to the agent broken: %s", self.index, e)
            nursery.cancel_scope.cancel()  # the agent is gone: so are we
        self.channel.close()

    async def on(self, msg: object, nursery: trio.Nursery) -> None:
        if isinstance(msg, SetState):
            self.store.update(msg.state)
            if msg.policies_changed and (cut := self.serving.reevaluate()):
                log.info("%d open connection(s) closed: the policies now deny them", cut)
        elif isinstance(msg, SetCredentials):
            self.certs.update(msg.copies, msg.gone)
        elif isinstance(msg, Serve):
            await self.channel.send(Done(msg.seq, await self.serve(msg, nursery)))
        elif isinstance(msg, Stop):
            self.serving.stop(msg.key)
        elif isinstance(msg, HandOver):
            self.serving.hand_over(nursery)
        elif isinstance(msg, Ask):
            await self.channel.send(self.stats(msg.seq, msg.metrics))
        else:
            raise WireError(f"unexpected {type(msg).__name__}")

    def stats(self, seq: int, metrics: bool = True) -> Stats:
        out, inbound = self.serving.tunnels()
        return Stats(
            seq,
            active=self.serving.active(),
            outbound=out,
            inbound=inbound,
            handled=self.serving.handled(),
            snapshot=self.store.current.version if self.store.loaded else -1,
            identities=tuple(sorted(map(str, self.certs.identities()))),
            metrics=list(self.registry.collect()) if metrics else None,
        )

    async def serve(self, msg: Serve, nursery: trio.Nursery) -> str | None:
        """Start serving a pod's listeners; why not, or None."""
        socks = [socket.socket(fileno=fd) for fd in msg.fds]
        self.serving.stop(msg.workload.key)  # sent again after a restart: the newest wins
        try:
            await self.serving.start(nursery, msg.workload, msg.netns, msg.ip, socks)
        except OSError as e:
            for s in socks:
                s.close()
            return str(e)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="veil agent worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    heap.keep_heap()
    raise_open_files()
    # Signals are for the control process: it hands over, drains and then closes the channel,
    # which ends us. A signal to the whole process group must not cut connections first.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    worker = Worker(args.index, args.node, args.trust_domain, sock)
    try:
        trio.run(worker.run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
