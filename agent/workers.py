"""The agent's worker processes (`veil agent --workers N`), seen from the control process.

The control process keeps everything that is the node's: the cluster state, capture, the
certificates, the pod registry, hand-over, admin and metrics. It opens each enrolled pod's
listeners and hands every worker a copy of them (SCM_RIGHTS): all workers accept from the
same sockets, each connection goes to one of them, each worker runs its own trio loop and
tunnel pools (`veil.agent.worker`). Every snapshot and every new certificate is sent to every
worker as it comes; a worker that asks for a certificate it lacks gets it fetched.

A worker that dies is started again (backoff 0.5 s doubling to 10 s) and given the state,
the certificates and every pod; meanwhile the others accept, and a connection queued on a
listener waits for one of them (never plaintext: the listeners stay in place).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from veil.agent.capture.netns import NetNs, listen
from veil.agent.proxy.pod import check_inherited, pod_addresses
from veil.agent.workerchannel import Channel, close_all
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
    encode,
)
from veil.core.spiffe import SpiffeId
from veil.core.state import Workload
from veil.runtime.identity.copies import CredentialCopy
from veil.runtime.identity.manager import CertificateManager, Credential, NoCertificate
from veil.runtime.store import StateStore

log = logging.getLogger("veil.workers")
ANSWER_TIMEOUT = 10.0  # a worker that takes longer to start serving a pod is broken
STATS_TIMEOUT = 2.0
RESTART_MAX = 10.0
STOP_WAIT = 2.0  # after its channel closed, a worker is killed if it has not exited


@dataclass
class _Pod:
    workload: Workload
    netns: str
    ip: str
    socks: list[socket.socket]


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any
    outbox: trio.MemorySendChannel[tuple[bytes, list[int]]]
    stats: Stats | None = None
    families: list[Any] = field(default_factory=list)  # its metrics, as last asked for
    pending: set[int] = field(default_factory=set)  # seqs this worker still owes


class WorkerPool:
    """`veil.agent.serving.PodServing` by worker processes."""

    def __init__(  # noqa: PLR0917
        self,
        count: int,
        node: str,
        trust_domain: str,
        store: StateStore,
        certs: CertificateManager,
        log_level: str = "info",
    ) -> None:
        self.count, self.node, self.trust_domain = count, node, trust_domain
        self.store, self.certs, self.log_level = store, certs, log_level
        self.pods: dict[str, _Pod] = {}
        self.workers: dict[int, _Worker] = {}  # running (or starting) now
        self.restarts = 0
        self.handed_over = False
        self._seq = itertools.count(1)
        self._answers: dict[int, trio.Event] = {}
        self._results: dict[int, Any] = {}
        self._sent_creds: dict[SpiffeId, Credential] = {}
        self._policies: object = None
        self._nursery: trio.Nursery | None = None

    # -- running the workers ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker, keep them running and informed until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for index in range(self.count):
                await nursery.start(self._supervise, index)
            nursery.start_soon(self._push_state)
            nursery.start_soon(self._push_credentials)
            log.info("%d worker process(es) serve this node's pods", self.count)
            task_status.started()

    async def _supervise(self, index: int, *, task_status: trio.TaskStatus[None]) -> None:
        delay = 0.5
        while True:
            started = trio.current_time()
            try:
                await self._run_one(index, task_status)
            except (OSError, WireError) as e:
                log.error("worker %d: %s", index, e)
            task_status = trio.TASK_STATUS_IGNORED  # started once: the rest are restarts
            self.restarts += 1
            if trio.current_time() - started > 30:
                delay = 0.5
            log.error("worker %d stopped; starting it again in %.1fs", index, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    async def _run_one(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable,
            "-m",
            "veil.agent.worker",
            *("--fd", str(theirs.fileno()), "--index", str(index)),
            *("--node", self.node, "--trust-domain", self.trust_domain),
            *("--log-level", self.log_level),
        ]
        try:
            process = await trio.lowlevel.open_process(argv, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        channel = Channel(ours)
        send, receive = trio.open_memory_channel[tuple[bytes, list[int]]](float("inf"))
        worker = _Worker(index, process, send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, index, channel, receive, nursery.cancel_scope)
                self.workers[index] = worker
                self._sync(worker)
                task_status.started()
                log.info("worker %d started (pid %d)", index, process.pid)
                try:
                    while (msg := await channel.receive()) is not None:
                        self._on(worker, msg)
                except (OSError, WireError) as e:
                    log.error("worker %d: channel broken: %s", index, e)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.workers.pop(index, None)
            for seq in worker.pending:  # the caller does not wait for a dead worker
                self._answer(seq, None)
            channel.close()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_WAIT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            send.close()
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:  # what was never sent: its sockets' duplicates close
                    close_all(receive.receive_nowait()[1])
            receive.close()
        log.warning("worker %d exited with status %s", index, process.returncode)

    @staticmethod
    async def _write(
        index: int,
        channel: Channel,
        outbox: trio.MemoryReceiveChannel[tuple[bytes, list[int]]],
        worker_scope: trio.CancelScope,
    ) -> None:
        """The worker's messages in the order they were queued (sends are never reordered:
        a Stop never passes the Serve before it). A broken channel ends the worker."""
        try:
            async for frame, fds in outbox:
                try:
                    await channel.send_frame(frame, fds)
                finally:
                    close_all(fds)
        except OSError as e:
            log.error("worker %d: cannot send to it: %s", index, e)
            worker_scope.cancel()

    def _queue(self, worker: _Worker, frame: bytes, socks: Sequence[socket.socket] = ()) -> None:
        """Queue a frame; the sockets go as duplicates, owned by the queue until sent."""
        fds = [os.dup(s.fileno()) for s in socks]
        try:
            worker.outbox.send_nowait((frame, fds))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            close_all(fds)

    def _sync(self, worker: _Worker) -> None:
        """A (re)started worker: everything it needs, before anything else is queued."""
        if self.store.loaded:
            self._queue(worker, encode(SetState(self.store.current)))
        creds = self.certs.credentials()
        copies = tuple(CredentialCopy.of(c) for c in creds.values())
        self._queue(worker, encode(SetCredentials(copies)))
        if self.handed_over:
            return
        for pod in self.pods.values():
            seq = next(self._seq)
            self._queue(worker, encode(self._serve(seq, pod)), pod.socks)

    @staticmethod
    def _serve(seq: int, pod: _Pod) -> Serve:
        return Serve(seq, pod.workload, pod.netns, pod.ip, len(pod.socks))

    def _on(self, worker: _Worker, msg: object) -> None:
        if isinstance(msg, Done):
            worker.pending.discard(msg.seq)
            if msg.error is not None and msg.seq not in self._answers:
                log.error("worker %d cannot serve a pod: %s", worker.index, msg.error)
            self._answer(msg.seq, msg.error)
        elif isinstance(msg, Stats):
            worker.pending.discard(msg.seq)
            worker.stats = msg
            if msg.metrics is not None:
                worker.families = msg.metrics
            self._answer(msg.seq, msg)
        elif isinstance(msg, Want):
            assert self._nursery is not None
            self._nursery.start_soon(self._fetch, msg.identity)
        else:
            raise WireError(f"unexpected {type(msg).__name__} from worker {worker.index}")

    def _answer(self, seq: int, result: Any) -> None:
        if (event := self._answers.get(seq)) is not None:
            self._results[seq] = result
            event.set()

    async def _ask_all(self, make: Any, sockets: Sequence[socket.socket] = ()) -> list[Any]:
        """Send a message with a fresh seq to every worker running now; their answers (None
        from a worker that died meanwhile: restarted, it gets everything anew)."""
        seqs = []
        for worker in list(self.workers.values()):
            seq = next(self._seq)
            self._answers[seq] = trio.Event()
            worker.pending.add(seq)
            self._queue(worker, encode(make(seq)), sockets)
            seqs.append(seq)
        try:
            with trio.move_on_after(ANSWER_TIMEOUT if sockets else STATS_TIMEOUT):
                for seq in seqs:
                    await self._answers[seq].wait()
            return [self._results.get(seq) for seq in seqs]
        finally:
            for seq in seqs:
                self._answers.pop(seq, None)
                self._results.pop(seq, None)

    async def _push_state(self) -> None:
        version = -1
        while True:
            state = await self.store.wait_newer(version)
            version = state.version
            changed = state.policies is not self._policies
            self._policies = state.policies
            frame = encode(SetState(state, changed))  # pickled once for every worker
            for worker in list(self.workers.values()):
                self._queue(worker, frame)

    async def _push_credentials(self) -> None:
        while True:
            creds = self.certs.credentials()
            new = tuple(
                CredentialCopy.of(c)
                for sid, c in creds.items()
                if self._sent_creds.get(sid) is not c
            )
            gone = tuple(sid for sid in self._sent_creds if sid not in creds)
            if new or gone:
                frame = encode(SetCredentials(new, gone))
                for worker in list(self.workers.values()):
                    self._queue(worker, frame)
                self._sent_creds = creds
            await self.certs.wait_changed()

    async def _fetch(self, sid: SpiffeId) -> None:
        with contextlib.suppress(NoCertificate):
            await self.certs.get(sid, timeout=30)

    # -- PodServing ------------------------------------------------------------------------

    async def start(
        self,
        nursery: trio.Nursery,
        w: Workload,
        netns: str,
        ip: str,
        listeners: Sequence[socket.socket],
    ) -> None:
        socks = list(listeners)
        if socks:
            check_inherited(socks, pod_addresses(ip))
        else:
            ns = NetNs(netns)
            try:
                for address in pod_addresses(ip):
                    socks.append(listen(ns, address))
            except OSError:
                for s in socks:
                    s.close()
                raise
            finally:
                ns.close()
        pod = self.pods[w.key] = _Pod(w, netns, ip, socks)
        answers = await self._ask_all(lambda seq: self._serve(seq, pod), socks)
        if errors := [a for a in answers if a is not None]:
            self.stop(w.key)
            raise OSError(errors[0])

    def stop(self, key: str) -> None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return
        frame = encode(Stop(key))
        for worker in list(self.workers.values()):
            self._queue(worker, frame)
        for s in pod.socks:
            s.close()

    def listeners(self, key: str) -> list[socket.socket]:
        return self.pods[key].socks

    def hand_over(self, nursery: trio.Nursery) -> None:
        """Workers stop accepting and drain; our copies of the listeners close (the
        successor holds its own)."""
        self.handed_over = True
        frame = encode(HandOver())
        for worker in list(self.workers.values()):
            self._queue(worker, frame)
        for pod in self.pods.values():
            for s in pod.socks:
                s.close()

    def reevaluate(self) -> int:
        return 0  # each worker judges its own connections when the policies it gets change

    def _stats(self) -> list[Stats]:
        return [w.stats for w in self.workers.values() if w.stats is not None]

    def tunnels(self) -> tuple[int, int]:
        stats = self._stats()
        return sum(s.outbound for s in stats), sum(s.inbound for s in stats)

    def active(self) -> int:
        return sum(s.active for s in self._stats())

    def handled(self) -> int:
        return sum(s.handled for s in self._stats())

    async def refresh(self, metrics: bool = True) -> None:
        await self._ask_all(lambda seq: Ask(seq, metrics))

    def describe(self) -> list[dict[str, Any]]:
        """Each worker as of the last `refresh()` (the admin's config dump)."""
        return [
            {
                "index": w.index,
                "pid": w.process.pid,
                "connections": w.stats.handled if w.stats else None,
                "active": w.stats.active if w.stats else None,
                "snapshot": w.stats.snapshot if w.stats else None,
                "certificates": len(w.stats.identities) if w.stats else None,
            }
            for _, w in sorted(self.workers.items())
        ]

    def metrics(self) -> list[Any]:
        """The workers' metric families, as of the last `refresh()`."""
        return [family for w in self.workers.values() for family in w.families]
