"""`veil agent`: the node agent process (trio.run, one nursery owning every task).

Today it reads cluster state, keeps a certificate for every identity scheduled on its node
and serves admin, metrics and readiness. Capture and the HBONE data path attach to the same
snapshot and certificate manager.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import asdict
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from veil.agent import node as node_api
from veil.agent.capture import modes as capture_modes
from veil.agent.capture.base import Capture, CaptureError
from veil.agent.cni import server as cni_server
from veil.agent.cni import shim_path
from veil.agent.cni.install import Installer
from veil.agent.enrollment import Enrollment
from veil.agent.handover import HandoverServer
from veil.agent.proxy.context import denied_counter
from veil.agent.proxy.pod import ProxyContext
from veil.agent.workers import WorkerPool
from veil.core import admission
from veil.core.authz import PolicySet
from veil.runtime import guard, heap, http
from veil.runtime.config import AgentConfig
from veil.runtime.identity.ca_client import CaEndpoint
from veil.runtime.identity.manager import CertificateManager
from veil.runtime.lifecycle import run_until_signalled
from veil.runtime.sources import kube_client, open_source
from veil.runtime.store import StateStore
from veil.runtime.telemetry.accesslog import AccessLog
from veil.runtime.telemetry.admin import AdminService
from veil.runtime.telemetry.families import Merged
from veil.runtime.telemetry.metrics import TcpMetrics

log = logging.getLogger("veil.agent")


class CaptureCollector(Collector):
    """eBPF capture's in-kernel counters, read at scrape time."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def collect(self) -> Any:
        counters = self.capture.counters()
        if not counters:
            return
        family = CounterMetricFamily(
            "veil_capture_ebpf_events",
            "Events counted by the eBPF capture programs",
            labels=["event"],
        )
        for event, value in sorted(counters.items()):
            family.add_metric([event], value)
        yield family


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.store = StateStore()
        self.source = open_source(cfg.state_dir, cfg.kubeconfig)
        self.certs = CertificateManager(CaEndpoint.of(cfg).request, registry=self.registry)
        self.access_log = AccessLog()
        self.proxy_ctx = ProxyContext(
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            store=self.store,
            certs=self.certs,
            metrics=TcpMetrics(self.registry, self.access_log),
            denied=denied_counter(self.registry),
        )
        self.capture = capture_modes.make(cfg.capture, cfg.bpf_pin_dir)
        self.workers: WorkerPool | None = None
        if cfg.workers > 1:
            level = logging.getLevelName(logging.getLogger("veil").getEffectiveLevel())
            self.workers = WorkerPool(
                cfg.workers, cfg.node, cfg.trust_domain, self.store, self.certs, level.lower()
            )
        self.enrollment = Enrollment(
            self.proxy_ctx, cfg.data_dir, self.capture, cfg.host_proc, self.workers
        )
        self.registry.register(CaptureCollector(self.capture))
        guard.register(self.registry)
        self.heap = heap.register(self.registry)
        admission.register(self.proxy_ctx.admission, self.registry)
        self.resumed = False
        self.handover = HandoverServer(
            self.enrollment.handover_socket,
            self.enrollment.locks.every,
            self.enrollment.listeners,
            self._release,
        )
        self._nursery: trio.Nursery | None = None
        self._ports = trio.CancelScope()  # admin, metrics, readiness: released on hand-over
        self._handed_over_at = 0.0
        self._drain_over = trio.Event()
        self.installer: Installer | None = None
        if cfg.cni_bin_dir is not None and cfg.cni_conf_dir is not None:
            plugin: dict[str, Any] = {
                "type": "veil-cni",
                "agentSocket": cfg.cni_host_socket or str(cfg.cni_socket),
            }
            if cfg.cni_exclude_namespaces:
                plugin["excludeNamespaces"] = list(cfg.cni_exclude_namespaces)
            self.installer = Installer(shim_path(), cfg.cni_bin_dir, cfg.cni_conf_dir, plugin)
        self._installing = trio.CancelScope()
        self.daemonset: node_api.DaemonSetWatch | None = None
        if cfg.daemonset and cfg.kubeconfig:
            self.daemonset = node_api.DaemonSetWatch(kube_client(cfg.kubeconfig), cfg.daemonset)
        self.snapshot_version = Gauge(
            "veil_agent_snapshot_version",
            "Version of the cluster state snapshot in use",
            registry=self.registry,
        )
        self.snapshot_time = Gauge(
            "veil_agent_snapshot_timestamp_seconds",
            "When the snapshot in use was taken (Unix time)",
            registry=self.registry,
        )
        self.admin = (
            AdminService(self.config_dump, self.not_ready, self.registry)
            if self.workers is None
            else AdminService(
                self.config_dump,
                self.not_ready,
                Merged(self.registry, self.workers.metrics),
                self.workers.refresh,
            )
        )
        pool = self.workers
        Gauge(
            "veil_agent_workers",
            "Processes serving the pods' traffic (1: the agent itself)",
            registry=self.registry,
        ).set_function(lambda: len(pool.workers) if pool is not None else 1)
        Gauge(
            "veil_agent_worker_restarts",
            "Worker processes that stopped and were started again",
            registry=self.registry,
        ).set_function(lambda: pool.restarts if pool is not None else 0)
        Gauge(
            "veil_agent_enrolled_pods", "Pods this agent captures", registry=self.registry
        ).set_function(lambda: len(self.enrollment.pods))
        Gauge(
            "veil_agent_outbound_tunnels",
            "Open HBONE connections from this node's pods",
            registry=self.registry,
        ).set_function(lambda: self.enrollment.tunnels()[0])
        Gauge(
            "veil_agent_inbound_tunnels",
            "Open HBONE connections to this node's pods",
            registry=self.registry,
        ).set_function(lambda: self.enrollment.tunnels()[1])
        Gauge(
            "veil_agent_capture_errors",
            "Capture installs or removals that failed",
            registry=self.registry,
        ).set_function(lambda: self.enrollment.capture_errors)
        Gauge(
            "veil_agent_registry_write_errors",
            "Writes of the pod registry that failed (disk full or read-only)",
            registry=self.registry,
        ).set_function(lambda: self.enrollment.registry_failures)
        Gauge(
            "veil_agent_snapshot_age_seconds",
            "Seconds since the snapshot in use was taken",
            registry=self.registry,
        ).set_function(lambda: time.time() - self._snapshot_at)
        self._snapshot_at = time.time()

    def identities(self) -> frozenset[Any]:
        return self.store.current.identities_on_node(self.cfg.node, self.cfg.trust_domain)

    def not_ready(self) -> str | None:
        if self.handover.handed_over.is_set():
            return "handed over to a new agent"
        if self.enrollment.capture_broken:
            return f"{self.capture.mode} capture unavailable: {self.enrollment.capture_broken}"
        if not self.store.loaded:
            return "cluster state not loaded"
        if why := self.source.not_synced():  # the last good state stays in force meanwhile
            return f"cluster state not synced: {why}"
        if not self.resumed:
            return "enrolled pods not resumed yet"
        if why := self.enrollment.registry_error:  # the pods in hand are served meanwhile
            return f"pod registry cannot be written: {why}"
        missing = [s for s in sorted(self.identities()) if self.certs.current(s) is None]
        if missing:
            failing = self.certs.failing()
            why = next((failing[s] for s in missing if s in failing), None)
            return f"no certificate yet for {', '.join(map(str, missing))}" + (
                f" (last error: {why})" if why else ""
            )
        if failing := self.certs.failing():  # the certificates in hand serve meanwhile
            sid, why = sorted(failing.items())[0]
            more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
            cred = self.certs.current(sid)
            until = (
                f"; the current one is valid until {cred.leaf.not_valid_after_utc.isoformat()}"
                if cred
                else ""
            )
            return f"certificate renewal failing for {sid}{more}: {why}{until}"
        return None

    def config_dump(self) -> dict[str, Any]:
        state = self.store.current
        return {
            "node": self.cfg.node,
            "pid": os.getpid(),
            "workers": {
                "count": self.cfg.workers,
                "restarts": self.workers.restarts if self.workers is not None else 0,
                "processes": self.workers.describe()
                if self.workers is not None
                else [
                    {
                        "index": 0,
                        "pid": os.getpid(),
                        "connections": self.enrollment.serving.handled(),
                        "active": self.enrollment.active(),
                        "snapshot": state.version,
                        "certificates": len(self.certs.credentials()),
                    }
                ],
            },
            "trustDomain": self.cfg.trust_domain,
            "snapshot": {
                "version": state.version,
                "namespaces": sorted(state.namespaces),
                "workloads": [
                    {
                        "namespace": w.namespace,
                        "name": w.name,
                        "node": w.node,
                        "ip": w.ip,
                        "serviceAccount": w.service_account,
                        "phase": w.phase,
                    }
                    for w in state.workloads
                ],
                "services": [
                    {
                        "namespace": s.namespace,
                        "name": s.name,
                        "vip": s.vip,
                        "ports": [p.port for p in s.ports],
                    }
                    for s in state.services
                ],
                "errors": list(state.errors),
            },
            "certificates": self.certs.snapshot(),
            "capture": {
                "mode": self.capture.mode,
                "error": self.enrollment.capture_broken,
                "counters": self.capture.counters(),
            },
            "enrolled": [asdict(e) for _, e in sorted(self.enrollment.pods.items())],
            "tunnels": dict(zip(("outbound", "inbound"), self.enrollment.tunnels(), strict=True)),
            "policies": {
                "inForce": sorted(self.store.current.policies.policies),
                "errors": self.store.current.policies.errors,
                "l7OnlyAtWaypoints": sorted(
                    r for r, p in self.store.current.policies.policies.items() if p.has_l7
                ),
            },
        }

    def note_policies(self, old: PolicySet, new: PolicySet) -> None:
        """Log what changed in the policies between two snapshots: each new error once."""
        for ref, err in sorted(new.errors.items()):
            if old.errors.get(ref) != err:
                fallback = (
                    "it denies everything in its scope until fixed"
                    if new.policies[ref].invalid
                    else "its previous version stays in force"
                )
                log.error("%s (%s)", err, fallback)
        for ref, p in sorted(new.policies.items()):
            if p.has_l7 and (ref not in old.policies or old.policies[ref] != p):
                log.warning(
                    "AuthorizationPolicy %s has L7 fields: waypoints enforce them; "
                    "this agent enforces its L4 part (%s)",
                    ref,
                    "its ALLOW rules with L7 fields never match here"
                    if p.action == "ALLOW"
                    else "its DENY rules deny on L4 alone",
                )

    async def follow_state(self) -> None:
        """Consumer of the snapshot: keep certificates for exactly the node's identities."""
        version = -1
        policies = PolicySet()
        while True:
            state = await self.store.wait_newer(version)
            version = state.version
            self.snapshot_version.set(version)
            self.snapshot_time.set(time.time())
            self._snapshot_at = time.time()
            self.certs.set_identities(self.identities())
            if state.policies is not policies:
                self.note_policies(policies, state.policies)
                policies = state.policies
                if cut := self.enrollment.reevaluate():
                    log.info("%d open connection(s) closed: the policies now deny them", cut)

    # -- hand-over and stopping ------------------------------------------------------------

    async def wait_certificates(self, timeout: float = 30.0) -> None:
        """Before taking a running agent's pods over: hold the certificates they need, so the
        first connection we accept finds them (a late one would still wait, not fail)."""
        with trio.move_on_after(timeout):
            while any(self.certs.current(s) is None for s in self.identities()):
                await trio.sleep(0.1)

    async def _release(self) -> None:
        """A successor serves our pods now (called under the enrollment lock)."""
        assert self._nursery is not None
        self._handed_over_at = trio.current_time()
        self.enrollment.hand_over(self._nursery)
        self._ports.cancel()
        self._installing.cancel()  # the successor keeps veil-cni chained now
        self._nursery.start_soon(self._report_drained)

    async def _drained(self) -> bool:
        """Wait (at most the drain period after the hand-over) until no connection is left."""
        with trio.move_on_at(self._handed_over_at + self.cfg.drain):
            await self.enrollment.serving.refresh(metrics=False)
            while self.enrollment.active():
                await trio.sleep(0.2)
                await self.enrollment.serving.refresh(metrics=False)
            return True
        return False

    async def _report_drained(self) -> None:
        if await self._drained():
            log.info("drained: every connection this agent held has ended")
        else:
            log.warning(
                "%d connection(s) still open after the %gs drain period: they are reset",
                self.enrollment.active(),
                self.cfg.drain,
            )
        self._drain_over.set()

    async def graceful_stop(self) -> None:
        """SIGTERM: hand over to a successor if one comes (a supervisor that restarts us is
        told to start it now), finish the connections in hand, then exit. Without a successor
        the pods keep their capture and are refused until an agent returns."""
        handed_over = self.handover.handed_over
        if (
            not handed_over.is_set()
            and self.daemonset is not None
            and await self.daemonset.is_deleted()
        ):
            await self.uninstall()
            return
        if not handed_over.is_set():
            if supervisor := os.environ.get("VEIL_SUPERVISOR_PID"):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(supervisor), signal.SIGHUP)  # "start my successor now"
            log.info("waiting up to %gs for a new agent to take over", self.cfg.handover_wait)
            with trio.move_on_after(self.cfg.handover_wait):
                await handed_over.wait()
        if handed_over.is_set():
            await self._drain_over.wait()
        else:
            log.warning("no new agent took over: enrolled pods are refused until an agent returns")

    async def uninstall(self) -> None:
        """Veil is being removed from the cluster: every pod released (its capture removed,
        it works unmeshed from now on) and veil-cni taken off the node, so new pods start."""
        log.warning(
            "DaemonSet %s deleted: uninstalling from node %s", self.cfg.daemonset, self.cfg.node
        )
        self._installing.cancel()
        if self.installer is not None:
            await trio.to_thread.run_sync(self.installer.uninstall)
        released = await self.enrollment.release_all()
        log.warning("uninstalled: %d pod(s) released, veil-cni removed", released)

    async def _run_installer(self, *, task_status: trio.TaskStatus[None]) -> None:
        assert self.installer is not None
        with self._installing:
            await self.installer.run(task_status=task_status)

    async def _clear_not_ready_taint(self) -> None:
        """Kubernetes: once we can capture, pods may be scheduled here (docs/install.md)."""
        assert self.cfg.kubeconfig is not None
        client = kube_client(self.cfg.kubeconfig)
        delay = 0.5
        while True:
            if self.not_ready() is None:
                try:
                    if await node_api.remove_taint(client, self.cfg.node):
                        log.info(
                            "node %s: taint %s removed", self.cfg.node, node_api.NOT_READY_TAINT
                        )
                    return
                except Exception as e:
                    log.warning(
                        "node %s: cannot remove taint %s yet: %s",
                        self.cfg.node,
                        node_api.NOT_READY_TAINT,
                        e,
                    )
                    delay = min(delay * 2, 10.0)
            await trio.sleep(delay)

    async def _serve_ports(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Admin, metrics and readiness; a predecessor still holds them until it released
        them (hand-over), so binding is retried for a while."""
        cfg = self.cfg
        with self._ports:
            async with trio.open_nursery() as nursery:
                for handler, (host, port) in (
                    (self.admin.admin, cfg.admin_listen),
                    (self.admin.metrics, cfg.metrics_listen),
                    (self.admin.readiness, cfg.ready_listen),
                ):
                    with trio.fail_after(30):
                        while True:
                            try:
                                await nursery.start(
                                    lambda task_status, h=handler, a=host, p=port: http.serve(
                                        h, a, p, task_status=task_status
                                    )
                                )
                                break
                            except OSError as e:
                                if e.errno != errno.EADDRINUSE:
                                    raise
                                await trio.sleep(0.1)
                task_status.started()

    async def run(self) -> None:
        cfg = self.cfg

        async def start(nursery: trio.Nursery) -> None:
            self._nursery = nursery
            try:
                await trio.to_thread.run_sync(self.capture.start)
            except CaptureError as e:
                log.error("%s capture cannot work; no pod will be enrolled: %s", cfg.capture, e)
                self.enrollment.capture_broken = str(e)
            await nursery.start(self.access_log.run)
            nursery.start_soon(heap.give_back_after_peaks, self.heap)
            await nursery.start(self.certs.run)
            await nursery.start(self.source.run, self.store)
            if self.workers is not None:
                await nursery.start(self.workers.run)
            nursery.start_soon(self.follow_state)
            await nursery.start(
                lambda task_status: self.enrollment.run(
                    before_takeover=self.wait_certificates, task_status=task_status
                )
            )
            self.resumed = True
            await nursery.start(cni_server.serve, self.enrollment, cfg.cni_socket)
            if self.installer is not None:  # veil-cni on the node once its socket answers
                await nursery.start(self._run_installer)
            await self.enrollment.confirm_takeover()
            await nursery.start(self.handover.serve)
            await nursery.start(self._serve_ports)
            if cfg.kubeconfig is not None:
                nursery.start_soon(self._clear_not_ready_taint)
            if self.daemonset is not None:
                nursery.start_soon(self.daemonset.run)
            log.info(
                "agent: node %s up (admin %s:%d, metrics %s:%d, ready %s:%d)",
                cfg.node,
                *cfg.admin_listen,
                *cfg.metrics_listen,
                *cfg.ready_listen,
            )

        try:
            await run_until_signalled("agent", start, self.graceful_stop)
        finally:
            # Enrolled pods keep their capture: refused, never plaintext (or a successor's).
            self.capture.close(handed_over=self.handover.handed_over.is_set())
