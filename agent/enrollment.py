"""Which pods this node's agent captures, and making it so.

A pod is enrolled when it runs on this node, is in a namespace labelled
`veil.dev/dataplane-mode: ambient` and is not itself labelled `none` (`MeshState.in_mesh`).
Enrolling opens the pod's listeners first and installs capture second, so a redirected
connection always finds a listener; any failure undoes both and the pod is not reported
enrolled (fail closed). Releasing removes capture first, then the listeners.

New pods arrive through veil-cni (`cni_add`, answered only once capture and listeners are in
place); running pods follow label changes through `reconcile()` on every snapshot. The set of
enrolled pods is kept on disk (`pods.json`), so a restarted agent resumes every pod: while it
is down, the pods' capture rules stay and redirect to listeners that are gone, so their
connections are refused, never sent in plaintext.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from veil.agent import handover, podfinder
from veil.agent.capture.base import Capture, CaptureError, CaptureTarget
from veil.agent.capture.modes import IptablesCapture
from veil.agent.proxy.pod import ProxyContext
from veil.agent.serving import InProcess, PodServing
from veil.core.state import MeshState, Workload

log = logging.getLogger("veil.enrollment")
NETNS_ANNOTATION = "lab.veil.dev/netns"
CGROUP_ANNOTATION = "lab.veil.dev/cgroup"
CNI_STATE_WAIT = 3.0  # how long a CNI ADD waits for the pod to appear in cluster state
REGISTRY_RETRY = 5.0  # seconds between writes of a registry that could not be written
# A pod that could not be enrolled (a capture tool failed) is tried again after this many
# seconds, doubling up to ENROLL_RETRY_MAX, until it is enrolled or no longer wanted.
ENROLL_RETRY = 0.5
ENROLL_RETRY_MAX = 30.0


class PodLocks:
    """One change per pod at a time, changes of different pods side by side; `every()` waits
    for the changes in progress and holds off new ones (a hand-over, an uninstall)."""

    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}
        self._users: Counter[str] = Counter()
        self._active = 0  # changes holding or waiting for a pod's lock
        self._idle = trio.Event()
        self._idle.set()
        self._every = trio.Lock()  # held by `every()`
        self._free = trio.Event()  # set while no `every()` holds changes off
        self._free.set()

    @contextlib.asynccontextmanager
    async def pod(self, key: str) -> AsyncIterator[None]:
        while not self._free.is_set():
            await self._free.wait()
        if self._active == 0:
            self._idle = trio.Event()
        self._active += 1
        lock = self._locks.setdefault(key, trio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def every(self) -> AsyncIterator[None]:
        async with self._every:
            self._free = trio.Event()
            try:
                while self._active:
                    await self._idle.wait()
                yield
            finally:
                self._free.set()


class EnrollError(RuntimeError):
    pass


@dataclass(frozen=True)
class Enrolled:
    namespace: str
    name: str
    uid: str
    netns: str  # path
    ip: str
    cgroup: str = ""  # path of the pod's cgroup v2 group (eBPF capture attaches there)

    @property
    def target(self) -> CaptureTarget:
        return CaptureTarget(self.netns, self.cgroup, self.ip)


def netns_path(w: Workload) -> str | None:
    """Where a running pod's netns is: the lab's annotation (a CNI ADD gives it directly)."""
    name = w.annotations.get(NETNS_ANNOTATION)
    return f"/run/netns/{name}" if name else None


def cgroup_path(w: Workload) -> str:
    """The pod's cgroup v2 group: the lab's annotation (on a node, the kubelet's pod slice)."""
    return w.annotations.get(CGROUP_ANNOTATION, "")


def wanted(state: MeshState, node: str, w: Workload) -> bool:
    return w.node == node and state.in_mesh(w)


@dataclass(frozen=True)
class ReconcilePlan:
    release: tuple[str, ...]  # enrolled pods (ns/name) to let go
    enroll: tuple[tuple[Workload, str], ...]  # pods to capture, with their netns path


def unwanted(state: MeshState, node: str, key: str, uid: str) -> bool:
    """An enrolled pod (ns/name, its uid) is to be released: gone, no longer wanted, or
    replaced (another uid under the same name)."""
    w = state.workload(*key.split("/", 1))
    return w is None or not wanted(state, node, w) or bool(w.uid and uid and w.uid != uid)


def plan_reconcile(
    state: MeshState,
    node: str,
    enrolled: Mapping[str, str],
    locate: Callable[[Workload], str | None],
) -> ReconcilePlan:
    """What following the labels asks for, given the pods enrolled now (ns/name -> uid):
    release a pod that is gone, no longer wanted, or replaced (another uid under the same
    name); enroll a wanted running pod of this node whose netns `locate` finds. Pure."""
    release = tuple(key for key, uid in enrolled.items() if unwanted(state, node, key, uid))
    enroll = tuple(
        (w, path)
        for w in state.workloads
        if (w.key not in enrolled or w.key in release)
        and wanted(state, node, w)
        and w.ip
        and (path := locate(w)) is not None
    )
    return ReconcilePlan(release, enroll)


class Enrollment:
    def __init__(
        self,
        ctx: ProxyContext,
        data_dir: Path,
        capture: Capture | None = None,
        host_proc: Path = Path("/proc"),
        serving: PodServing | None = None,
    ) -> None:
        self.ctx = ctx
        self.serving: PodServing = serving or InProcess(ctx)
        self.host_proc = host_proc  # the node's /proc (in a DaemonSet pod: mounted elsewhere)
        self.capture: Capture = capture or IptablesCapture()
        self.capture_broken: str | None = None  # why capture cannot work at all
        self.registry_file = data_dir / "pods.json"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pods: dict[str, Enrolled] = {}  # key: namespace/name
        self.locks = PodLocks()
        self._nursery: trio.Nursery | None = None
        self.capture_errors = 0
        self.registry_error: str | None = None  # why the registry cannot be written now
        self.registry_failures = 0
        self.enroll_failed: set[str] = set()  # pods the last reconcile could not enroll
        self.handover_socket = data_dir / "handover.sock"
        self.handed_over = False  # a successor serves our pods: change nothing from now on
        self.predecessor: handover.Predecessor | None = None

    # -- registry --------------------------------------------------------------------------

    def _save(self) -> None:
        """Write the registry; a disk that is full or read-only is said (log, metric,
        readiness) and tried again every REGISTRY_RETRY seconds and at every change, never
        fatal: the pods in hand stay served, and a restarted agent finds them again from the
        cluster state."""
        if self.handed_over:
            return  # the registry is the successor's now
        tmp = self.registry_file.with_name(".pods.json.tmp")
        doc = json.dumps({k: asdict(v) for k, v in sorted(self.pods.items())}, indent=1)
        try:
            tmp.write_text(doc)
            tmp.replace(self.registry_file)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.registry_failures += 1
            if self.registry_error is None:
                log.error(
                    "pod registry %s cannot be written (%s): the %d enrolled pods stay "
                    "served; retrying every %gs and at every change",
                    self.registry_file,
                    e.strerror or e,
                    len(self.pods),
                    REGISTRY_RETRY,
                )
            self.registry_error = f"{self.registry_file}: {e.strerror or e}"
            return
        if self.registry_error is not None:
            log.info("pod registry %s written again", self.registry_file)
        self.registry_error = None

    def _load(self) -> dict[str, Enrolled]:
        try:
            doc = json.loads(self.registry_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            log.error("pod registry %s is unreadable (%s); starting empty", self.registry_file, e)
            return {}
        return {k: Enrolled(**v) for k, v in doc.items()}

    def reevaluate(self) -> int:
        """Judge every enrolled pod's live inbound connections again (after a policy
        change); how many were cut."""
        return self.serving.reevaluate()

    def tunnels(self) -> tuple[int, int]:
        """Open HBONE connections: (outbound, pooled by our pods; inbound, to our pods)."""
        return self.serving.tunnels()

    # -- enroll / release --------------------------------------------------------------------

    async def _enroll(
        self,
        w: Workload,
        netns: str,
        ip: str,
        cgroup: str | None = None,
        listeners: Sequence[socket.socket] = (),
    ) -> None:
        key = w.key
        if key in self.pods:
            return
        if self.handed_over:
            raise EnrollError("this agent handed its pods over to a new agent; try again")
        if self.capture_broken:
            raise EnrollError(f"{self.capture.mode} capture is unavailable: {self.capture_broken}")
        assert self._nursery is not None
        cgroup = cgroup_path(w) if cgroup is None else cgroup
        entry = Enrolled(w.namespace, w.name, w.uid, netns, ip, cgroup)
        try:
            await self.serving.start(self._nursery, w, netns, ip, listeners)
        except OSError as e:
            raise EnrollError(f"cannot open listeners in {netns}: {e}") from None
        try:
            await trio.to_thread.run_sync(self.capture.install, entry.target)
        except CaptureError as e:
            self.serving.stop(key)
            self.capture_errors += 1
            raise EnrollError(str(e)) from None
        self.pods[key] = entry
        self._save()
        log.info("enrolled %s (%s, netns %s)", key, ip, netns)

    async def _release(self, key: str) -> None:
        entry = self.pods.get(key)
        if entry is None:
            return
        if Path(entry.netns).exists() or entry.cgroup:
            try:
                await trio.to_thread.run_sync(self.capture.remove, entry.target)
            except CaptureError as e:
                self.capture_errors += 1
                log.error("releasing %s: %s", key, e)
        self.serving.stop(key)
        del self.pods[key]
        self._save()
        log.info("released %s", key)

    async def cni_add(self, namespace: str, name: str, netns: str, ip: str) -> bool:
        """Called by veil-cni: True once the pod is captured, False if it is not in the mesh."""
        key = f"{namespace}/{name}"
        with trio.move_on_after(CNI_STATE_WAIT):
            while (w := self.ctx.store.current.workload(namespace, name)) is None:
                await self.ctx.store.wait_newer(self.ctx.store.current.version)
        if w is None:
            raise EnrollError(f"pod {key} is not in cluster state after {CNI_STATE_WAIT:g}s")
        state = self.ctx.store.current
        if not wanted(state, self.ctx.node, w):
            return False
        async with self.locks.pod(key):
            if key in self.pods:
                # A new sandbox for a pod we hold (its network set up again, maybe at the same
                # path after a DEL we never heard of): what we captured is gone or going.
                log.info("cni ADD for enrolled %s: capturing its new network", key)
                await self._release(key)
            await self._enroll(w, netns, ip)
        return True

    async def cni_del(self, namespace: str, name: str) -> None:
        async with self.locks.pod(f"{namespace}/{name}"):
            if self.handed_over:
                raise EnrollError("this agent handed its pods over to a new agent; try again")
            await self._release(f"{namespace}/{name}")

    async def reconcile(self, state: MeshState) -> None:
        """Follow labels of running pods: enroll the wanted, release the others. Pods are
        changed side by side (as many at once as the capture mode allows: iptables' rule
        changes mostly wait on the kernel), each under its own lock, so a CNI ADD of another
        pod never waits for a whole namespace; each step is checked again against the newest
        state when its turn comes."""
        if self.handed_over:
            return
        found: dict[str, podfinder.PodLocation] | None = None

        def locate(w: Workload) -> str | None:
            nonlocal found
            if (path := netns_path(w)) is not None:  # the lab's manifest mode says
                return path if Path(path).exists() else None
            if found is None:  # one /proc scan per reconcile, and only when needed
                found = podfinder.scan(self.host_proc)
            where = found.get(w.uid)
            return where.netns if where else None

        plan = plan_reconcile(
            state, self.ctx.node, {key: e.uid for key, e in self.pods.items()}, locate
        )
        node = self.ctx.node
        limit = trio.CapacityLimiter(getattr(self.capture, "concurrency", 1))

        async def release(key: str) -> None:
            async with limit, self.locks.pod(key):
                if self.handed_over:
                    return
                if (e := self.pods.get(key)) and unwanted(self.ctx.store.current, node, key, e.uid):
                    await self._release(key)

        async def enroll(w: Workload, path: str) -> None:
            async with limit, self.locks.pod(w.key):
                if self.handed_over:
                    return
                newest = self.ctx.store.current
                now = newest.workload(w.namespace, w.name)
                if (
                    w.key in self.pods  # a CNI ADD was first
                    or now is None
                    or now.uid != w.uid
                    or not now.ip
                    or not wanted(newest, node, now)
                    or not Path(path).exists()
                ):
                    return
                where = (found or {}).get(w.uid)
                try:
                    await self._enroll(now, path, now.ip, where.cgroup if where else None)
                except EnrollError as e:
                    failed.add(w.key)
                    log.error("cannot enroll %s: %s (tried again shortly)", w.key, e)

        failed: set[str] = set()
        async with trio.open_nursery() as nursery:  # releases first: a replaced pod's too
            for key in plan.release:
                nursery.start_soon(release, key)
        async with trio.open_nursery() as nursery:
            for w, path in plan.enroll:
                nursery.start_soon(enroll, w, path)
        self.enroll_failed = failed

    # -- hand-over ---------------------------------------------------------------------------

    def listeners(self) -> dict[str, tuple[dict[str, Any], list[socket.socket]]]:
        """What a successor takes over: every enrolled pod and its listening sockets."""
        return {
            key: (asdict(entry), self.serving.listeners(key))
            for key, entry in sorted(self.pods.items())
        }

    def hand_over(self, nursery: trio.Nursery) -> None:
        """The successor serves our pods now: stop accepting, finish what we hold."""
        self.handed_over = True
        self.serving.hand_over(nursery)

    async def release_all(self) -> int:
        """Uninstall: every pod released (capture removed first); how many."""
        async with self.locks.every():
            keys = list(self.pods)
            for key in keys:
                await self._release(key)
            self.handed_over = True  # nothing is enrolled again by this agent
        return len(keys)

    def active(self) -> int:
        """Connections still being handled (a drain waits for 0)."""
        return self.serving.active()

    async def confirm_takeover(self) -> None:
        """Tell the predecessor (if we took over from one) that we serve its pods now."""
        pred, self.predecessor = self.predecessor, None
        if pred is not None:
            try:
                await pred.confirm()
            except (handover.HandoverError, OSError, trio.TooSlowError) as e:
                log.warning("the previous agent did not confirm the hand-over: %s", e)

    async def _resume(self, state: MeshState) -> None:
        """Enroll the pods a predecessor hands over (their listeners as they are), else the
        registry's (new listeners; meanwhile their connections were refused)."""
        inherited: dict[str, tuple[Enrolled, list[socket.socket]]] = {}
        try:
            self.predecessor = await handover.take_over(self.handover_socket)
        except handover.HandoverError as e:
            log.error("%s; resuming from the registry", e)
        for key, (raw, socks) in (self.predecessor.pods if self.predecessor else {}).items():
            try:
                inherited[key] = (Enrolled(**raw), socks)
            except TypeError as e:
                log.error("the previous agent's entry for %s is unusable: %s", key, e)
                for s in socks:
                    s.close()
        entries = self._load()
        entries.update({key: entry for key, (entry, _) in inherited.items()})
        for key, entry in entries.items():
            listeners = inherited.get(key, (entry, []))[1]
            w = state.workload(entry.namespace, entry.name)
            if w is None or not Path(entry.netns).exists():
                if Path(entry.netns).exists() and not listeners:
                    with contextlib.suppress(CaptureError):
                        await trio.to_thread.run_sync(self.capture.remove, entry.target)
                for s in listeners:
                    s.close()
                log.info("not resuming %s: the pod is gone", key)
                continue
            try:
                async with self.locks.pod(key):
                    await self._enroll(w, entry.netns, entry.ip, entry.cgroup or None, listeners)
            except EnrollError as e:
                for s in listeners:
                    s.close()
                log.error("cannot resume %s: %s", key, e)

    async def run(
        self,
        *,
        before_takeover: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Resume the registry's pods (taking their listeners over from a running agent, if
        any: `before_takeover` first waits until we can serve them), then follow every
        snapshot until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            store = self.ctx.store
            while not store.loaded:
                await store.wait_newer(store.current.version)
            if before_takeover is not None:
                await before_takeover()
            await self._resume(store.current)
            self._save()
            self.capture.forget_others()
            task_status.started()
            version = -1
            retry, enroll_at = ENROLL_RETRY, 0.0
            while True:
                # Woken by a change, or to write the registry again (every few seconds while
                # it cannot be written), or to try again a pod the last reconcile could not
                # enroll (a tool failed, a netns was busy): never left for good to a state
                # that may not change for days.
                deadline = math.inf
                if self.registry_error is not None:
                    deadline = trio.current_time() + REGISTRY_RETRY
                if self.enroll_failed:
                    deadline = min(deadline, enroll_at)
                with trio.move_on_at(deadline):
                    await store.wait_newer(version)
                changed = store.current.version != version
                if not changed and self.registry_error is not None:
                    self._save()  # synchronous: no change can come in between
                due = bool(self.enroll_failed) and trio.current_time() >= enroll_at
                if not changed and not due:
                    continue
                state = store.current
                version = state.version
                await self.reconcile(state)
                if self.enroll_failed:
                    enroll_at = trio.current_time() + retry
                    retry = min(retry * 2, ENROLL_RETRY_MAX)
                else:
                    retry = ENROLL_RETRY
