"""Cluster state from the Kubernetes API: list, then watch from the list's resourceVersion,
each kind in its own task, every change handed to the `StateBuilder` as an event, and a
snapshot published after each burst of events (the same interface as `ManifestSource`).

A watch that ends is resumed from the last resourceVersion seen; 410 Gone (the version is too
old) relists and replaces what the list no longer holds. Errors back off with jitter (1 s
doubling to 30 s) and the last good state stays in force meanwhile: `ready` says whether
every kind has been listed at least once, `not_synced()` why the state may be stale (a kind
that cannot be listed or followed right now), for the daemons' readiness. A kind the API
does not serve (404: its CRD is not installed) has no objects, and is looked for again every
15-30 s until it appears.

The agent, CA, controller and waypoints use it with `--kubeconfig` (a file, or
`in-cluster`). Watch bookmarks are not asked for (lightkube's watch does not pass them): a
watch that ends is resumed from the last event's version, and relisted on 410.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import trio
from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import ConfigMap, Namespace, Pod, Service

from veil.core.extauthz import MESH_CONFIG
from veil.core.state import ObjectKey, StateBuilder, object_key
from veil.runtime.sources.jwks import fetch_jwks
from veil.runtime.store import StateStore

log = logging.getLogger("veil.state.kubernetes")
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
SETTLE = 0.05  # events arriving within this are published as one snapshot


@dataclass(frozen=True)
class Kind:
    resource: Any  # a lightkube resource class (global or namespaced)
    api_version: str
    kind: str
    node_scoped: bool = False  # only the pods of this node (`spec.nodeName`)
    namespaced: bool = True
    only: tuple[str, str] | None = None  # one object: (namespace, name), e.g. the mesh config


def _generic(group: str, version: str, kind: str, plural: str) -> Kind:
    res = create_namespaced_resource(group, version, kind, plural)
    return Kind(res, f"{group}/{version}", kind)


KINDS: tuple[Kind, ...] = (
    Kind(Namespace, "v1", "Namespace", namespaced=False),
    Kind(Pod, "v1", "Pod", node_scoped=True),
    Kind(Service, "v1", "Service"),
    _generic("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    _generic("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    _generic("gateway.networking.k8s.io", "v1beta1", "ReferenceGrant", "referencegrants"),
    _generic("gateway.networking.k8s.io", "v1", "TCPRoute", "tcproutes"),
    _generic("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
    _generic("security.veil.dev", "v1", "AuthorizationPolicy", "authorizationpolicies"),
    _generic("security.veil.dev", "v1", "RequestAuthentication", "requestauthentications"),
    _generic("traffic.veil.dev", "v1", "TrafficPolicy", "trafficpolicies"),
    # the mesh config (ext_authz providers): one ConfigMap, readable by a Role in its namespace
    Kind(ConfigMap, "v1", "ConfigMap", only=(MESH_CONFIG[1], MESH_CONFIG[2])),
)


def status_code(e: Exception) -> int | None:
    """The HTTP status of a failed API call: lightkube's ApiError, or httpx's error when the
    answer carried no Kubernetes Status (a 404 for a kind not served)."""
    if isinstance(e, ApiError):
        return int(e.status.code or 0)
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return int(code) if isinstance(code, int) else None


def as_object(kind: Kind, obj: Any) -> dict[str, Any]:
    """The API object as the state's builder reads it (the list's items carry no kind)."""
    doc: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    doc["apiVersion"], doc["kind"] = kind.api_version, kind.kind
    return doc


class KubernetesSource:
    def __init__(
        self,
        client: AsyncClient,
        node: str | None = None,
        kinds: tuple[Kind, ...] = KINDS,
        rng: random.Random | None = None,
    ) -> None:
        self.client, self.node, self.kinds = client, node, kinds
        self.builder = StateBuilder(fetch_jwks)
        self.listed: set[str] = set()  # kinds listed at least once
        self.failing: dict[str, str] = {}  # kind -> its last error, while it is failing
        self.rng = rng or random.Random()
        self._changed = trio.Event()

    @property
    def ready(self) -> bool:
        return self.listed >= {k.kind for k in self.kinds}

    def not_synced(self) -> str | None:
        """Why the state may be stale (the last good one stays in force), None when every
        kind is listed and followed."""
        if not self.ready:
            missing = sorted({k.kind for k in self.kinds} - self.listed)
            return f"not listed yet: {', '.join(missing)}"
        if self.failing:
            kind, error = sorted(self.failing.items())[0]
            more = f" (and {len(self.failing) - 1} more kinds)" if len(self.failing) > 1 else ""
            return f"the API is not answering for {kind}{more}: {error}"
        return None

    def _fields(self, kind: Kind) -> dict[str, Any] | None:
        if kind.only is not None:
            return {"metadata.name": kind.only[1]}
        return {"spec.nodeName": self.node} if kind.node_scoped and self.node else None

    @staticmethod
    def _namespace(kind: Kind) -> str | None:
        if kind.only is not None:
            return kind.only[0]
        return "*" if kind.namespaced else None  # every namespace

    def _touch(self) -> None:
        self._changed.set()

    async def _list(self, kind: Kind, known: set[ObjectKey]) -> str:
        """Replace everything of `kind` with the list's; its resourceVersion."""
        items = self.client.list(
            kind.resource, namespace=self._namespace(kind), fields=self._fields(kind)
        )
        seen: set[ObjectKey] = set()
        async for obj in items:
            doc = as_object(kind, obj)
            self.builder.apply(doc)
            seen.add(object_key(doc))
        for key in known - seen:
            self.builder.delete(key)
        known.clear()
        known.update(seen)
        self.listed.add(kind.kind)
        self.failing.pop(kind.kind, None)
        self._touch()
        return str(items.resourceVersion)

    async def _follow(self, kind: Kind) -> None:
        """List, then watch, for as long as the source runs."""
        known: set[ObjectKey] = set()
        backoff = BACKOFF_START
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list(kind, known)
                    backoff = BACKOFF_START
                async for op, obj in self.client.watch(
                    kind.resource,
                    namespace=self._namespace(kind),
                    fields=self._fields(kind),
                    resource_version=version,
                ):
                    doc = as_object(kind, obj)
                    version = str(doc.get("metadata", {}).get("resourceVersion") or version)
                    key = object_key(doc)
                    if op == "DELETED":
                        self.builder.delete(key)
                        known.discard(key)
                    else:
                        self.builder.apply(doc)
                        known.add(key)
                    self._touch()
                    backoff = BACKOFF_START
            except Exception as e:  # the API unreachable, a timeout: keep the last good state
                code = status_code(e)
                if code == 410:  # too old: list again
                    log.info("%s: resourceVersion %s expired, listing again", kind.kind, version)
                    version = None
                    continue
                if code == 404 and version is None:
                    self.failing.pop(kind.kind, None)
                    # The API does not serve the kind (its CRD is not installed): there are
                    # none of it, truly. Looked for again until it appears.
                    if kind.kind not in self.listed:
                        log.info("%s: not served by the API (CRD not installed?)", kind.kind)
                        for key in known:
                            self.builder.delete(key)
                        known.clear()
                        self.listed.add(kind.kind)
                        self._touch()
                    await trio.sleep(BACKOFF_MAX * self.rng.uniform(0.5, 1.0))
                    continue
                log.warning("%s: %s (again in %.1f s)", kind.kind, e, backoff)
                self.failing[kind.kind] = str(e) or type(e).__name__
                version = None
            await trio.sleep(backoff * self.rng.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def run(
        self, store: StateStore, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish a snapshot per burst of changes, until cancelled; started once every kind
        the API serves has been listed (or at once if it is unreachable: the state stays
        empty and `ready` false, so the agent fails closed)."""
        version = store.current.version
        async with trio.open_nursery() as nursery:
            for kind in self.kinds:
                nursery.start_soon(self._follow, kind)
            with trio.move_on_after(10):
                while not self.ready:
                    await self._changed.wait()
                    self._changed = trio.Event()
            version += 1
            store.update(self.builder.snapshot(version))
            task_status.started()
            while True:
                await self._changed.wait()
                await trio.sleep(SETTLE)
                self._changed = trio.Event()
                version += 1
                state = self.builder.snapshot(version)
                store.update(state)


def summary(state: Any) -> dict[str, Any]:
    """What a snapshot holds, briefly (for `python -m veil.runtime.sources.kubernetes`)."""
    return {
        "version": state.version,
        "namespaces": sorted(state.namespaces),
        "pods": sorted(f"{w.namespace}/{w.name}@{w.node}" for w in state.workloads),
        "services": sorted(f"{s.namespace}/{s.name}={s.vip}" for s in state.services),
        "routes": [r.key for r in state.routes],
        "invalid": sorted("/".join(k) for k in state.invalid),
    }


async def _dump(kubeconfig: str, node: str | None) -> None:
    import json  # noqa: PLC0415

    from lightkube import KubeConfig  # noqa: PLC0415

    client = AsyncClient(config=KubeConfig.from_file(kubeconfig))
    store = StateStore()
    async with trio.open_nursery() as nursery:
        await nursery.start(KubernetesSource(client, node).run, store)
        seen = -1
        while True:
            state = await store.wait_newer(seen)
            seen = state.version
            print(json.dumps(summary(state)), flush=True)


def main() -> None:
    """Print a line per snapshot the source publishes: a debugging aid, and how the lab's
    tests watch the source work against the real API server."""
    import sys  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m veil.runtime.sources.kubernetes KUBECONFIG [NODE]")
    trio.run(_dump, sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)


if __name__ == "__main__":
    main()
