"""The immutable snapshot of cluster state every consumer reads (pure conversion + indexes)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from veil.core import extauthz, jwt, routes, traffic
from veil.core.authz import PolicySet
from veil.core.jwt import RequestAuthentication
from veil.core.routes import HttpRoute, ReferenceGrant
from veil.core.spiffe import SpiffeId
from veil.core.traffic import TrafficPolicy

DATAPLANE_MODE = "veil.dev/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"
USE_WAYPOINT = "veil.dev/use-waypoint"
USE_WAYPOINT_NAMESPACE = "veil.dev/use-waypoint-namespace"  # the waypoint is in another one
# Plaintext from outside the mesh to a pod bound to a waypoint goes through the waypoint
# (carried there by the pod's agent) instead of being refused; on a Service or a namespace.
INGRESS_USE_WAYPOINT = "veil.dev/ingress-use-waypoint"
WAYPOINT_REPLICAS = "veil.dev/replicas"  # on a waypoint Gateway: how many pods run it
MAX_WAYPOINT_REPLICAS = 100


def waypoint_replicas(annotations: Mapping[str, Any]) -> int | None:
    """The Gateway's `veil.dev/replicas` (1-100); None when absent. ValueError when bad."""
    raw = annotations.get(WAYPOINT_REPLICAS)
    if raw is None:
        return None
    text = str(raw)
    if not text.isdigit() or not 1 <= int(text) <= MAX_WAYPOINT_REPLICAS:
        raise ValueError(
            f"annotation {WAYPOINT_REPLICAS}: {text!r} is not a number of pods "
            f"(1-{MAX_WAYPOINT_REPLICAS})"
        )
    return int(text)


WAYPOINT_FOR = "veil.dev/waypoint-for"
WAYPOINT_CLASS = "veil-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
ALLOW_BYPASS = "veil.dev/allow-waypoint-bypass"  # "true": direct traffic is accepted too


ObjectKey = tuple[str, str, str]  # (kind, namespace, name)


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
    app_protocol: str = ""  # `appProtocol`: kubernetes.io/h2c, grpc, http2 ... (HTTP/2 to pods)

    @property
    def speaks_http2(self) -> bool:
        """Whether the pods behind this port take HTTP/2 (prior knowledge): its appProtocol
        says so, or without one its name (`grpc`, `grpc-web`, `http2`, `h2c`, or with a
        `-suffix`), as Istio reads Service ports."""
        if self.app_protocol:
            return self.app_protocol.lower() in HTTP2_APP_PROTOCOLS
        prefix = self.name.lower().split("-", 1)[0]
        return prefix in ("grpc", "http2", "h2c")


HTTP2_APP_PROTOCOLS = frozenset({"kubernetes.io/h2c", "h2c", "http2", "grpc", "grpc-web"})


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    vip: str | None
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Waypoint:
    """A Gateway of class veil-waypoint: its pods run `veil waypoint` as service account
    <gateway name>; `waypoint_for` says which traffic it takes (service, workload or all)."""

    namespace: str
    name: str
    waypoint_for: str = "service"
    # Which namespaces may send their traffic through it (its HBONE listener's
    # allowedRoutes.namespaces, as Istio reads it): Same (the default), All, or Selector.
    allowed_from: str = "Same"
    allowed_selector: tuple[tuple[str, str], ...] = ()  # matchLabels (hashable)

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.name)

    def takes(self, kind: str) -> bool:
        return self.waypoint_for in (kind, "all")

    def admits(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """May objects of `namespace` (with these labels) use this waypoint?"""
        if namespace == self.namespace or self.allowed_from == "All":
            return True
        if self.allowed_from == "Selector":
            return all(labels.get(k) == v for k, v in self.allowed_selector)
        return False


def waypoint_from(obj: Mapping[str, Any]) -> Waypoint | None:
    spec = obj.get("spec") or {}
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        return None
    md = obj.get("metadata") or {}
    labels = _str_map(md.get("labels"))
    wfor = labels.get(WAYPOINT_FOR, "service")
    if wfor not in ("service", "workload", "all", "none"):
        raise ValueError(f"label {WAYPOINT_FOR}: {wfor!r} is not service, workload, all or none")
    allowed = "Same"
    selector: tuple[tuple[str, str], ...] = ()
    for listener in spec.get("listeners") or []:
        if not isinstance(listener, dict) or listener.get("protocol") not in (None, "HBONE"):
            continue
        rule = ((listener.get("allowedRoutes") or {}).get("namespaces")) or {}
        frm = rule.get("from", "Same")
        if frm not in ("Same", "All", "Selector"):
            raise ValueError(f"allowedRoutes.namespaces.from: {frm!r} is not Same, All or Selector")
        if frm == "Selector":
            sel = rule.get("selector") or {}
            if set(sel) - {"matchLabels"}:
                raise ValueError("allowedRoutes.namespaces.selector: only matchLabels is supported")
            selector = tuple(sorted(_str_map(sel.get("matchLabels")).items()))
        if frm == "All" or allowed == "Same":
            allowed = frm
    return Waypoint(md.get("namespace", "default"), md["name"], wfor, allowed, selector)


@dataclass(frozen=True)
class MeshState:
    """One version of the cluster. Never mutated: a change is a new MeshState."""

    version: int = 0
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    # Kinds no typed view exists for, as read (no consumer reads them; config dumps do).
    others: tuple[Mapping[str, Any], ...] = ()
    errors: tuple[str, ...] = ()  # objects a source could not convert, and why
    # AuthorizationPolicies, parsed once by the writer (each keeps its last valid version).
    policies: PolicySet = field(default_factory=PolicySet)
    # The L7 kinds, parsed once per change of the object by the writer; an object that does
    # not validate is absent here and its error is in `invalid`.
    waypoints: Mapping[tuple[str, str], Waypoint] = field(default_factory=dict)
    routes: tuple[HttpRoute, ...] = ()
    tcp_routes: tuple[HttpRoute, ...] = ()  # TCPRoutes, in HttpRoute's shape (one rule)
    reference_grants: tuple[ReferenceGrant, ...] = ()
    traffic_policies: tuple[TrafficPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    mesh_config: extauthz.MeshConfig = extauthz.EMPTY  # ConfigMap veil-system/veil-mesh
    # Why an object (or a part of it: an HTTPRoute rule) is not in force, by (kind,
    # namespace, name): attached to the object it belongs to, for logs now and status
    # conditions on Kubernetes.
    invalid: Mapping[ObjectKey, str] = field(default_factory=dict)

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

    @cached_property
    def _traffic_by_target(self) -> Mapping[tuple[str, str, str], TrafficPolicy]:
        out: dict[tuple[str, str, str], TrafficPolicy] = {}
        for p in self.traffic_policies:  # the first one (by namespace/name) wins, as before
            for name in p.services:
                out.setdefault(("Service", p.namespace, name), p)
            for name in p.routes:
                out.setdefault(("HTTPRoute", p.namespace, name), p)
        return out

    def traffic_policy(self, kind: str, namespace: str, name: str) -> TrafficPolicy | None:
        """The TrafficPolicy targeting a Service or an HTTPRoute, if any."""
        return self._traffic_by_target.get((kind, namespace, name))

    def waypoint_pods(self, wp: Waypoint) -> list[Workload]:
        """The ready pods that run a waypoint."""
        return [
            w
            for w in self.workloads
            if w.namespace == wp.namespace
            and w.labels.get(GATEWAY_NAME_LABEL) == wp.name
            and w.ready
            and w.ip
        ]

    def _use_waypoint(self, namespace: str, own: Mapping[str, str], kind: str) -> Waypoint | None:
        """`veil.dev/use-waypoint` on the object, else on its namespace; `none` opts out.
        `veil.dev/use-waypoint-namespace` beside it names the waypoint's namespace when not
        the same; that waypoint must admit this namespace (its allowedRoutes), else the label
        is not acted on (as Istio)."""
        ns = self.namespaces.get(namespace)
        ns_labels = ns.labels if ns else {}
        where = own if own.get(USE_WAYPOINT) else ns_labels
        name = where.get(USE_WAYPOINT)
        if not name or name == NONE:
            return None
        wp_ns = where.get(USE_WAYPOINT_NAMESPACE) or namespace
        wp = self.waypoints.get((wp_ns, name))
        if wp is None or not wp.takes(kind) or not wp.admits(namespace, ns_labels):
            return None
        return wp

    def service_waypoint(self, service: Service) -> Waypoint | None:
        return self._use_waypoint(service.namespace, service.labels, "service")

    def workload_waypoint(self, w: Workload) -> Waypoint | None:
        if w.labels.get(GATEWAY_NAME_LABEL):
            return None  # a waypoint never sends its own traffic through a waypoint
        return self._use_waypoint(w.namespace, w.labels, "workload")

    def services_of(self, w: Workload) -> list[Service]:
        return [
            s
            for s in self.services
            if s.namespace == w.namespace
            and s.selector
            and all(w.labels.get(k) == v for k, v in s.selector.items())
        ]

    @cached_property
    def _bound(self) -> dict[tuple[str, str], frozenset[Waypoint]]:
        return {}  # filled as pods are asked about: the outbound path asks per connection

    def bound_waypoints(self, w: Workload) -> frozenset[Waypoint]:
        """Waypoints traffic to this pod must come through (its own, its services'), unless
        the namespace, the Service or the pod says `veil.dev/allow-waypoint-bypass: "true"`.
        Computed once per pod and snapshot (a scan of the namespace's Services)."""
        if not self.waypoints:
            return frozenset()
        key = (w.namespace, w.name)
        hit = self._bound.get(key)
        if hit is None:
            hit = self._bound[key] = frozenset(self._bound_waypoints(w))
        return hit

    def _bound_waypoints(self, w: Workload) -> set[Waypoint]:
        ns = self.namespaces.get(w.namespace)
        if ns is not None and ns.labels.get(ALLOW_BYPASS) == "true":
            return set()
        out = {
            wp
            for s in self.services_of(w)
            if s.labels.get(ALLOW_BYPASS) != "true" and (wp := self.service_waypoint(s))
        }
        if w.labels.get(ALLOW_BYPASS) != "true" and (own := self.workload_waypoint(w)):
            out.add(own)
        return out

    def ingress_uses_waypoint(self, w: Workload) -> bool:
        """Whether plaintext from outside the mesh to this pod goes through its waypoint:
        its namespace or one of its Services says `veil.dev/ingress-use-waypoint: "true"`."""
        ns = self.namespaces.get(w.namespace)
        if ns is not None and ns.labels.get(INGRESS_USE_WAYPOINT) == "true":
            return True
        return any(s.labels.get(INGRESS_USE_WAYPOINT) == "true" for s in self.services_of(w))

    @cached_property
    def workloads_by_key(self) -> Mapping[tuple[str, str], Workload]:
        return {(w.namespace, w.name): w for w in self.workloads}

    @cached_property
    def workloads_by_namespace(self) -> Mapping[str, tuple[Workload, ...]]:
        out: dict[str, list[Workload]] = {}
        for w in self.workloads:
            out.setdefault(w.namespace, []).append(w)
        return {k: tuple(v) for k, v in out.items()}

    def workload(self, namespace: str, name: str) -> Workload | None:
        return self.workloads_by_key.get((namespace, name))

    def in_mesh(self, w: Workload) -> bool:
        """Enrolled by labels: namespace `veil.dev/dataplane-mode: ambient`, pod not `none`."""
        ns = self.namespaces.get(w.namespace)
        return (
            ns is not None
            and ns.labels.get(DATAPLANE_MODE) == AMBIENT
            and w.labels.get(DATAPLANE_MODE) != NONE
            and w.phase not in ("Succeeded", "Failed")
        )

    @cached_property
    def services_by_key(self) -> Mapping[tuple[str, str], Service]:
        return {(s.namespace, s.name): s for s in self.services}

    def service(self, namespace: str, name: str) -> Service | None:
        return self.services_by_key.get((namespace, name))

    def endpoints(self, service: Service, port: ServicePort) -> list[tuple[Workload, int]]:
        """Ready pods behind a service port, with the pod port it maps to."""
        out = []
        for w in self.workloads_by_namespace.get(service.namespace, ()):
            if (
                not service.selector
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
        owner=owner_workload(md),
    )


def owner_workload(md: Mapping[str, Any]) -> str:
    """The pod's workload as Istio names it: its owner, and for a ReplicaSet made by a
    Deployment (`<deployment>-<pod-template-hash>`) the Deployment."""
    ref = next((r for r in md.get("ownerReferences") or [] if isinstance(r, dict)), None)
    if ref is None:
        return ""
    name = str(ref.get("name", ""))
    suffix = f"-{(md.get('labels') or {}).get('pod-template-hash', '')}"
    if ref.get("kind") == "ReplicaSet" and len(suffix) > 1 and name.endswith(suffix):
        return name[: -len(suffix)]
    return name


def service_from(obj: Mapping[str, Any]) -> Service:
    md, spec = obj["metadata"], obj.get("spec") or {}
    vip = spec.get("clusterIP")
    vip = None if vip in (None, "", "None") else str(ipaddress.ip_address(vip))
    ports = tuple(
        ServicePort(
            port=int(p["port"]),
            target_port=p.get("targetPort", p["port"]),
            name=p.get("name") or "",
            app_protocol=str(p.get("appProtocol") or ""),
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


def build_state(
    objects: Iterable[Mapping[str, Any]], version: int, fetch_jwks: jwt.FetchJwks | None = None
) -> MeshState:
    """Convert API objects into a snapshot; an object that cannot be read is reported, not fatal."""
    builder = StateBuilder(fetch_jwks)
    for obj in objects:
        builder.apply(obj)
    return builder.snapshot(version)


_SKIPPED = frozenset({"Node", "ServiceAccount", "Deployment", "EndpointSlice"})  # derived, unused


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    md = obj.get("metadata") or {}
    if not isinstance(md, Mapping):
        md = {}
    return str(obj.get("kind", "")), str(md.get("namespace", "")), str(md.get("name", "?"))


class StateBuilder:
    """The single writer's memory of the cluster, updated by events.

    `apply()` takes one object added or changed, `delete()` one removed (a watch event, or a
    manifest file that changed): only that object is converted, so a change costs O(changed
    objects) in conversion; `snapshot()` then assembles the immutable MeshState the consumers
    read (sorting what is already nearly sorted). Objects are keyed by (kind, namespace, name);
    one that cannot be read is kept as an error of its key, and a later good version of it
    replaces the error.
    """

    def __init__(self, fetch_jwks: jwt.FetchJwks | None = None) -> None:
        """`fetch_jwks` reads a RequestAuthentication's jwksUri (the source's I/O)."""
        self.namespaces: dict[str, Namespace] = {}
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.services: dict[tuple[str, str], Service] = {}
        self.others: dict[ObjectKey, Mapping[str, Any]] = {}
        self.errors: dict[ObjectKey, str] = {}
        self.policies = PolicySet()
        self._policies_changed = False
        self.waypoints: dict[ObjectKey, Waypoint] = {}
        self.routes: dict[ObjectKey, HttpRoute] = {}
        self.tcp_routes: dict[ObjectKey, HttpRoute] = {}
        self.grants: dict[ObjectKey, ReferenceGrant] = {}
        self.traffic: dict[ObjectKey, TrafficPolicy] = {}
        self.authns: dict[ObjectKey, RequestAuthentication] = {}
        self.mesh_config = extauthz.EMPTY
        self.invalid: dict[ObjectKey, str] = {}
        self.fetch_jwks = fetch_jwks

    def apply(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj)
        kind, ns, name = key
        self.delete(key)
        if kind in _SKIPPED:
            return
        try:
            if kind == "Namespace":
                md = obj["metadata"]
                self.namespaces[name] = Namespace(md["name"], _str_map(md.get("labels")))
            elif kind == "Pod":
                w = workload_from(obj)
                self.workloads[(w.namespace, w.name)] = w
            elif kind == "Service":
                svc = service_from(obj)
                self.services[(svc.namespace, svc.name)] = svc
            elif kind == "ConfigMap":  # only the mesh config is read
                if key == extauthz.MESH_CONFIG:
                    self._mesh_config(obj)
            else:
                self.others[key] = obj
                self._typed(key, obj)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            ref = f"{kind} {ns}/{name}".replace(" /", " ")
            self.errors[key] = f"{ref}: cannot read: {e!r}"

    def _mesh_config(self, obj: Mapping[str, Any]) -> None:
        """A mesh config that cannot be read keeps no provider: CUSTOM policies then deny."""
        try:
            self.mesh_config = extauthz.parse_mesh_config(obj)
        except extauthz.ProviderError as e:
            self.mesh_config = extauthz.EMPTY
            self.invalid[extauthz.MESH_CONFIG] = str(e)
            return
        if self.mesh_config.unusable:
            self.invalid[extauthz.MESH_CONFIG] = "; ".join(self.mesh_config.unusable.values())

    def _typed(self, key: ObjectKey, obj: Mapping[str, Any]) -> None:
        """The typed view of an L7 object, or its validation error."""
        kind = key[0]
        try:
            if kind == "Gateway":
                if (wp := waypoint_from(obj)) is not None:
                    self.waypoints[key] = wp
            elif kind in routes.HTTP_ROUTE_KINDS:
                route = self.routes[key] = routes.parse_http_kind(obj)
                if route.problems:  # in force, but these rules answer 500
                    self.invalid[key] = "; ".join(
                        f"{p} (the rule answers 500)" for p in route.problems
                    )
            elif kind in routes.TCP_ROUTE_KINDS:
                self.tcp_routes[key] = routes.parse_tcp_route(obj)
            elif kind == "ReferenceGrant":
                self.grants[key] = routes.parse_reference_grant(obj)
            elif kind == traffic.KIND and str(obj.get("apiVersion", "")).startswith(traffic.GROUP):
                self.traffic[key] = traffic.parse_traffic_policy(obj)
            elif kind == jwt.KIND:
                self.authns[key] = jwt.parse_request_authentication(obj, self.fetch_jwks)
        except (routes.RouteError, traffic.PolicyError, jwt.JwtError) as e:
            self.invalid[key] = str(e)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.invalid[key] = f"{kind} {key[1]}/{key[2]}: cannot read: {e!r}"

    def _policy_errors(self) -> dict[ObjectKey, str]:
        out: dict[ObjectKey, str] = {}
        for ref, err in self.policies.errors.items():
            ns, _, name = ref.partition("/")
            out[("AuthorizationPolicy", ns, name)] = err
        return out

    def delete(self, key: ObjectKey) -> None:
        kind, ns, name = key
        self.errors.pop(key, None)
        self.invalid.pop(key, None)
        typed_views = (
            self.waypoints,
            self.routes,
            self.tcp_routes,
            self.grants,
            self.traffic,
            self.authns,
        )
        for typed in typed_views:
            typed.pop(key, None)
        if kind == "AuthorizationPolicy":
            self._policies_changed = True
        if kind == "Namespace":
            self.namespaces.pop(name, None)
        elif kind == "Pod":
            self.workloads.pop((ns or "default", name), None)
        elif kind == "Service":
            self.services.pop((ns or "default", name), None)
        elif key == extauthz.MESH_CONFIG:
            self.mesh_config = extauthz.EMPTY
        else:
            self.others.pop(key, None)

    def snapshot(self, version: int, extra_errors: Iterable[str] = ()) -> MeshState:
        if self._policies_changed:  # parsed again only when one of them changed
            self.policies = self.policies.update(
                o for k, o in self.others.items() if k[0] == "AuthorizationPolicy"
            )
            self._policies_changed = False
        return MeshState(
            version=version,
            namespaces=dict(self.namespaces),
            workloads=tuple(self.workloads[k] for k in sorted(self.workloads)),
            services=tuple(self.services[k] for k in sorted(self.services)),
            others=tuple(self.others.values()),
            errors=(*self.errors.values(), *extra_errors),
            policies=self.policies,
            waypoints={(w.namespace, w.name): w for w in self.waypoints.values()},
            routes=tuple(self.routes[k] for k in sorted(self.routes)),
            tcp_routes=tuple(self.tcp_routes[k] for k in sorted(self.tcp_routes)),
            reference_grants=tuple(self.grants[k] for k in sorted(self.grants)),
            traffic_policies=tuple(self.traffic[k] for k in sorted(self.traffic)),
            request_authentications=tuple(self.authns[k] for k in sorted(self.authns)),
            mesh_config=self.mesh_config,
            invalid={**self.invalid, **self._policy_errors()},
        )
