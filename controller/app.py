"""`veil controller` as a process: follows Gateways of class veil-waypoint and keeps each
one's objects applied (server-side, field manager `veil-controller`) and its status current;
and, as the one status writer, follows cluster state (the same KubernetesSource the agents
use) and writes each policy's and route's verdict (status.py) where it changed.

One reconcile pass per Gateway event, and one every `RESYNC` seconds (a Deployment's ready
replicas and a Service's address change without the Gateway changing). A pass that fails
(the API away, a conflict) is logged, counted and retried at the next one; the objects a
deleted Gateway owned are removed by Kubernetes' garbage collector (ownerReferences).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from lightkube import ApiError, AsyncClient
from lightkube.codecs import from_dict
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Service

from veil.controller.status import desired_status, differs
from veil.controller.waypoints import (
    Settings,
    gateway_status,
    is_waypoint,
    waypoint_objects,
    waypoints_binding,
)
from veil.core.state import MeshState
from veil.runtime.store import StateStore

log = logging.getLogger("veil.controller")
Gateway = create_namespaced_resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways")
FIELD_MANAGER = "veil-controller"
RESYNC = 2.0


@dataclass(frozen=True)
class ControllerConfig:
    kubeconfig: str
    image: str
    ca_address: str
    # the CA's roots (PEM), published to each waypoint as a ConfigMap: from a file, or from
    # the ConfigMap the CA publishes (`namespace/name`, key root-cert.pem)
    trust_bundle: Path | None = None
    trust_configmap: str | None = None
    trust_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        if (self.trust_bundle is None) == (self.trust_configmap is None):
            raise ValueError("give one of --trust-bundle FILE or --trust-configmap NS/NAME")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WaypointController:
    def __init__(self, client: AsyncClient, cfg: ControllerConfig) -> None:
        self.client, self.cfg = client, cfg
        self.settings = Settings(cfg.image, cfg.ca_address, cfg.trust_domain)
        self.failures = 0
        self._subjects: list[Any] | None = None
        self._changed = trio.Event()

    async def gateways(self) -> list[dict[str, Any]]:
        return [as_dict(g) async for g in self.client.list(Gateway, namespace="*")]

    async def bundle(self) -> str:
        if self.cfg.trust_bundle is not None:
            return self.cfg.trust_bundle.read_text()
        assert self.cfg.trust_configmap is not None
        ns, _, name = self.cfg.trust_configmap.partition("/")
        cm = await self.client.get(ConfigMap, name, namespace=ns)
        pem = (cm.data or {}).get("root-cert.pem")
        if not pem:
            raise ValueError(f"ConfigMap {ns}/{name} has no root-cert.pem")
        return str(pem)

    async def reconcile(self, gw: dict[str, Any]) -> None:
        md = gw["metadata"]
        name, ns = md["name"], md["namespace"]
        if md.get("deletionTimestamp"):
            return
        bundle = await self.bundle()
        for obj in waypoint_objects(gw, self.settings, bundle):
            await self.client.apply(from_dict(obj), field_manager=FIELD_MANAGER, force=True)
        address, ready = None, 0
        try:
            svc = await self.client.get(Service, name, namespace=ns)
            address = svc.spec.clusterIP if svc.spec else None
            dep = await self.client.get(Deployment, name, namespace=ns)
            ready = (dep.status.readyReplicas or 0) if dep.status else 0
        except ApiError as e:
            if e.status.code != 404:
                raise
        status = gateway_status(gw, address, ready, now())
        old = gw.get("status") or {}
        if [{**c, "lastTransitionTime": ""} for c in status["conditions"]] != [
            {**c, "lastTransitionTime": ""} for c in old.get("conditions") or []
        ] or status.get("addresses") != old.get("addresses"):
            await self.client.patch(
                Gateway.Status,
                name,
                {"status": status},
                namespace=ns,
                patch_type=_merge(),
                field_manager=FIELD_MANAGER,
            )
            log.info("gateway %s/%s: %s", ns, name, status["conditions"][1]["message"])

    async def pass_once(self) -> None:
        gateways = [g for g in await self.gateways() if is_waypoint(g)]
        binding = waypoints_binding(gateways)
        if binding["subjects"] != self._subjects:
            await self.client.apply(from_dict(binding), field_manager=FIELD_MANAGER, force=True)
            self._subjects = binding["subjects"]
        for gw in gateways:
            try:
                await self.reconcile(gw)
            except Exception as e:  # one Gateway's trouble never stops the others
                self.failures += 1
                md = gw["metadata"]
                log.warning("gateway %s/%s: %s", md["namespace"], md["name"], e)

    async def _watch(self) -> None:
        """Wake the loop on any Gateway change; the watch is resumed when it ends."""
        while True:
            try:
                async for _op, _obj in self.client.watch(Gateway, namespace="*"):
                    self._changed.set()
            except Exception as e:
                log.warning("watching Gateways: %s", e)
            await trio.sleep(1.0)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            task_status.started()
            while True:
                try:
                    await self.pass_once()
                except Exception as e:  # the API away: the next pass tries again
                    self.failures += 1
                    log.warning("reconcile pass failed: %s", e)
                with trio.move_on_after(RESYNC):
                    await self._changed.wait()
                self._changed = trio.Event()


def as_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = obj.to_dict()
    return out


def _merge() -> Any:
    from lightkube.types import PatchType  # noqa: PLC0415

    return PatchType.MERGE


class StatusWriter:
    """Writes what status.py says on each object whose verdict changed, after each snapshot.
    A merge patch of the status subresource: nothing to conflict with but ourselves; a failed
    write is retried with the next snapshot or after RESYNC."""

    def __init__(self, client: AsyncClient, store: StateStore) -> None:
        from veil.runtime.sources.kubernetes import KINDS  # noqa: PLC0415

        self.client, self.store = client, store
        self.resources = {k.kind: k.resource for k in KINDS}
        self.written = 0
        self.failures = 0

    async def write_all(self, state: MeshState) -> None:
        t = now()
        for obj in state.others:
            desired = desired_status(obj, state, t)
            if desired is None or not differs(obj.get("status"), desired):
                continue
            md = obj["metadata"]
            try:
                await self.client.patch(
                    self.resources[obj["kind"]].Status,
                    md["name"],
                    {"status": desired},
                    namespace=md["namespace"],
                    patch_type=_merge(),
                    field_manager=FIELD_MANAGER,
                )
                self.written += 1
            except Exception as e:  # gone meanwhile, the API away: the next snapshot retries
                self.failures += 1
                log.warning("status of %s %s/%s: %s", obj["kind"], md["namespace"], md["name"], e)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        version = -1
        while True:
            with trio.move_on_after(RESYNC * 5):
                await self.store.wait_newer(version)
            state = self.store.current
            version = state.version
            if self.store.loaded:
                await self.write_all(state)


async def run(cfg: ControllerConfig) -> None:
    from veil.runtime.lifecycle import run_until_signalled  # noqa: PLC0415
    from veil.runtime.sources import kube_client  # noqa: PLC0415
    from veil.runtime.sources.kubernetes import KubernetesSource  # noqa: PLC0415

    client = kube_client(cfg.kubeconfig)
    ctl = WaypointController(client, cfg)
    store = StateStore()
    writer = StatusWriter(client, store)

    async def start(nursery: trio.Nursery) -> None:
        await nursery.start(KubernetesSource(client).run, store)
        await nursery.start(writer.run)
        await nursery.start(ctl.run)
        log.info("controller: waypoints of class veil-waypoint, image %s", cfg.image)

    await run_until_signalled("controller", start)
