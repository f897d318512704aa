"""The immutable snapshot of cluster state every consumer reads (pure conversion + indexes)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from agent.identity.spiffe import SpiffeId

DATAPLANE_MODE = "veil.dev/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """A pod, as the mesh sees it."""

    namespace: str
    name: str
    node: str
    service_account: str
    ip: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    phase: str = "Pending"
    ready: bool = False
    uid: str = ""
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports
    owner: str = ""  # the controller (Deployment) that made the pod, if any

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    vip: str | None
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MeshState:
    """One version of the cluster. Never mutated: a change is a new MeshState."""

    version: int = 0
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    # Kinds no typed view exists for yet (policies, routes, gateways), as read.
    others: tuple[Mapping[str, Any], ...] = ()
    errors: tuple[str, ...] = ()  # objects a source could not convert, and why

    @cached_property
    def workloads_by_ip(self) -> Mapping[str, Workload]:
        return {w.ip: w for w in self.workloads if w.ip}

    @cached_property
    def workloads_by_node(self) -> Mapping[str, tuple[Workload, ...]]:
        out: dict[str, list[Workload]] = {}
        for w in self.workloads:
            out.setdefault(w.node, []).append(w)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def services_by_vip(self) -> Mapping[tuple[str, int], tuple[Service, ServicePort]]:
        return {(s.vip, p.port): (s, p) for s in self.services if s.vip for p in s.ports}

    def workload(self, namespace: str, name: str) -> Workload | None:
        return next(
            (w for w in self.workloads if w.namespace == namespace and w.name == name), None
        )

    def in_mesh(self, w: Workload) -> bool:
        """Enrolled by labels: namespace `veil.dev/dataplane-mode: ambient`, pod not `none`."""
        ns = self.namespaces.get(w.namespace)
        return (
            ns is not None
            and ns.labels.get(DATAPLANE_MODE) == AMBIENT
            and w.labels.get(DATAPLANE_MODE) != NONE
            and w.phase not in ("Succeeded", "Failed")
        )

    def endpoints(self, service: Service, port: ServicePort) -> list[tuple[Workload, int]]:
        """Ready pods behind a service port, with the pod port it maps to."""
        out = []
        for w in self.workloads:
            if (
                w.namespace != service.namespace
                or not service.selector
                or not w.ready
                or not w.ip
                or any(w.labels.get(k) != v for k, v in service.selector.items())
            ):
                continue
            target = port.target_port
            number = target if isinstance(target, int) else w.ports.get(str(target))
            if number is not None:
                out.append((w, int(number)))
        return out

    def identities_on_node(self, node: str, trust_domain: str) -> frozenset[SpiffeId]:
        """Identities of the pods scheduled on a node that are not finished."""
        return frozenset(
            w.identity(trust_domain)
            for w in self.workloads_by_node.get(node, ())
            if w.phase not in ("Succeeded", "Failed")
        )


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (value or {}).items()} if isinstance(value, dict) else {}


def workload_from(obj: Mapping[str, Any]) -> Workload:
    md, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ports = {
        str(p["name"]): int(p["containerPort"])
        for c in spec.get("containers") or []
        for p in c.get("ports") or []
        if p.get("name")
    }
    ip = status.get("podIP")
    if ip is not None:
        ip = str(ipaddress.ip_address(ip))
    return Workload(
        namespace=md.get("namespace", "default"),
        name=md["name"],
        node=spec.get("nodeName") or "",
        service_account=spec.get("serviceAccountName") or "default",
        ip=ip,
        labels=_str_map(md.get("labels")),
        annotations=_str_map(md.get("annotations")),
        phase=status.get("phase", "Pending"),
        ready=ready,
        uid=md.get("uid", ""),
        ports=ports,
        owner=next(
            (
                str(r.get("name", ""))
                for r in md.get("ownerReferences") or []
                if isinstance(r, dict)
            ),
            "",
        ),
    )


def service_from(obj: Mapping[str, Any]) -> Service:
    md, spec = obj["metadata"], obj.get("spec") or {}
    vip = spec.get("clusterIP")
    vip = None if vip in (None, "", "None") else str(ipaddress.ip_address(vip))
    ports = tuple(
        ServicePort(
            port=int(p["port"]),
            target_port=p.get("targetPort", p["port"]),
            name=p.get("name") or "",
        )
        for p in spec.get("ports") or []
    )
    return Service(
        namespace=md.get("namespace", "default"),
        name=md["name"],
        vip=vip,
        ports=ports,
        selector=_str_map(spec.get("selector")),
        labels=_str_map(md.get("labels")),
    )


def build_state(objects: Iterable[Mapping[str, Any]], version: int) -> MeshState:
    """Convert API objects into a snapshot; an object that cannot be read is reported, not fatal."""
    namespaces: dict[str, Namespace] = {}
    workloads: list[Workload] = []
    services: list[Service] = []
    others: list[Mapping[str, Any]] = []
    errors: list[str] = []
    for obj in objects:
        kind = obj.get("kind")
        md = obj.get("metadata") or {}
        ref = f"{kind} {md.get('namespace', '')}/{md.get('name', '?')}".replace(" /", " ")
        try:
            if kind == "Namespace":
                namespaces[md["name"]] = Namespace(md["name"], _str_map(md.get("labels")))
            elif kind == "Pod":
                workloads.append(workload_from(obj))
            elif kind == "Service":
                services.append(service_from(obj))
            elif kind in ("Node", "ServiceAccount", "Deployment", "EndpointSlice"):
                continue  # derived or not needed by consumers yet
            else:
                others.append(obj)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            errors.append(f"{ref}: cannot read: {e!r}")
    return MeshState(
        version=version,
        namespaces=namespaces,
        workloads=tuple(sorted(workloads, key=lambda w: (w.namespace, w.name))),
        services=tuple(sorted(services, key=lambda s: (s.namespace, s.name))),
        others=tuple(others),
        errors=tuple(errors),
    )
