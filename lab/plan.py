"""What a lab will be, computed from manifests before anything is created (pure functions).

`make_plan()` turns accepted objects into nodes, pods (Deployments expanded), services with
VIPs, and checks every cross reference (namespace, service account, node). The renderers
(`render_hosts`, `render_service_nat`) turn the plan plus runtime facts (pod IPs) into the
files and rules the lab installs; they are golden-tested.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from veil.core.ports import HBONE_PORT
from veil.core.state import (
    DATAPLANE_MODE,
    GATEWAY_NAME_LABEL,
    NONE,
    WAYPOINT_CLASS,
    WAYPOINT_REPLICAS,
    waypoint_replicas,
)
from veil.lab.manifests import (
    Container,
    ContainerPort,
    Deployment,
    ManifestError,
    Meta,
    Namespace,
    Object,
    Pod,
    PodSpec,
    Service,
    ServiceAccount,
    ServicePort,
)

SERVICE_CIDR = IPv4Network("10.96.0.0/16")
CLUSTER_CIDR = IPv4Network("10.244.0.0/16")  # node i's pod range is its i-th subnet
NODE_MASK = 24  # a node's pod range by default: room for 245 pods (from .10)
NODE_MASKS = range(20, 29)
UNDERLAY_CIDR = IPv4Network("172.30.0.0/24")
LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
MAX_NODES = 50
CLUSTER_DOMAIN = "cluster.local"


def pod_cidr(node_index: int, mask: int = NODE_MASK) -> IPv4Network:
    """Node i's pod range: the i-th /mask subnet of the cluster's (10.244.i.0/24 at /24)."""
    base = int(CLUSTER_CIDR.network_address) + node_index * 2 ** (32 - mask)
    return IPv4Network((base, mask))


def recorded_mask(pod_range: str) -> int:
    """A recorded node's range back to its mask (labs recorded before masks were settable
    have 10.244.i.0/24)."""
    return IPv4Network(pod_range).prefixlen


def check_lab_name(name: str) -> str:
    if not LAB_NAME.match(name):
        raise ValueError(
            f"invalid lab name {name!r}: use 1-12 lowercase letters and digits, "
            "starting with a letter (it prefixes network namespace names)"
        )
    return name


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    mask: int = NODE_MASK

    @property
    def pod_cidr(self) -> IPv4Network:
        return pod_cidr(self.index, self.mask)

    @property
    def gateway(self) -> IPv4Address:
        return self.pod_cidr.network_address + 1

    @property
    def underlay_ip(self) -> IPv4Address:
        return UNDERLAY_CIDR.network_address + 10 + self.index


@dataclass(frozen=True)
class PodPlan:
    namespace: str
    name: str
    node: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: PodSpec
    owner: str | None  # the Deployment that made it, if any
    source: Object = field(repr=False, compare=False)

    @property
    def uid(self) -> str:
        return stable_uid("Pod", self.namespace, self.name)

    def named_port(self, name: str) -> int | None:
        for c in self.spec.containers:
            for p in c.ports:
                if p.name == name:
                    return p.container_port
        return None


@dataclass(frozen=True)
class ServicePlan:
    namespace: str
    name: str
    cluster_ip: IPv4Address
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]
    source: Service = field(repr=False, compare=False)

    def selects(self, pod: PodPlan) -> bool:
        return (
            bool(self.selector)
            and pod.namespace == self.namespace
            and all(pod.labels.get(k) == v for k, v in self.selector.items())
        )

    def target_port(self, port: ServicePort, pod: PodPlan) -> int | None:
        """The pod port a service port forwards to; None when a named port is missing."""
        if isinstance(port.target_port, int):
            return port.target_port
        return pod.named_port(port.target_port)


@dataclass(frozen=True)
class LabPlan:
    name: str
    nodes: tuple[NodePlan, ...]
    namespaces: tuple[Namespace, ...]
    service_accounts: tuple[ServiceAccount, ...]
    deployments: tuple[Deployment, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    others: tuple[Object, ...]

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)


@dataclass(frozen=True)
class Endpoint:
    """A ready pod behind a service port, as an EndpointSlice would list it."""

    ip: IPv4Address
    port: int
    pod: str
    node: str


class Named(Protocol):
    """A pod as the renderers need it: a plan's pod, or one the kubelet runs from the API."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...


class VipService(Named, Protocol):
    """A service with its ClusterIP: a plan's, or one read from the API server."""

    @property
    def cluster_ip(self) -> IPv4Address: ...


def stable_uid(*parts: str) -> str:
    h = hashlib.sha256("/".join(parts).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def node_names(count: int, mask: int = NODE_MASK) -> tuple[NodePlan, ...]:
    if mask not in NODE_MASKS:
        raise ValueError(
            f"--node-cidr-mask-size must be between {NODE_MASKS[0]} and {NODE_MASKS[-1]}, "
            f"got {mask}"
        )
    most = min(MAX_NODES, 2 ** (mask - CLUSTER_CIDR.prefixlen) - 1)  # subnet 0 is no node's
    if not 1 <= count <= most:
        why = f" (a /{mask} per node in {CLUSTER_CIDR})" if most < MAX_NODES else ""
        raise ValueError(f"--nodes must be between 1 and {most}{why}, got {count}")
    return tuple(NodePlan(name=f"node{i}", index=i, mask=mask) for i in range(1, count + 1))


def make_plan(
    objects: Sequence[Object], lab_name: str, node_count: int, mask: int = NODE_MASK
) -> LabPlan:
    check_lab_name(lab_name)
    nodes = node_names(node_count, mask)
    namespaces = [o for o in objects if isinstance(o, Namespace)]
    if not any(n.meta.name == "default" for n in namespaces):
        namespaces.insert(0, _implicit_namespace("default"))
    ns_names = {n.meta.name for n in namespaces}
    accounts = [o for o in objects if isinstance(o, ServiceAccount)]
    for ns in sorted(ns_names):  # every namespace has a "default" service account
        if not any(a.meta.namespace == ns and a.meta.name == "default" for a in accounts):
            accounts.append(_implicit_account(ns))
    sa_names = {(a.meta.namespace, a.meta.name) for a in accounts}

    for o in objects:
        if o.meta.namespace is not None and o.meta.namespace not in ns_names:
            raise ManifestError(
                o.origin,
                o.ref,
                "metadata.namespace",
                f"namespace {o.meta.namespace!r} is not defined in the "
                "manifests (add a Namespace object)",
            )

    pods: list[PodPlan] = []
    for o in objects:
        if isinstance(o, Pod):
            pods.append(
                PodPlan(
                    namespace=o.meta.namespace or "default",
                    name=o.meta.name,
                    node="",
                    labels=o.meta.labels,
                    annotations=o.meta.annotations,
                    spec=o.spec,
                    owner=None,
                    source=o,
                )
            )
        elif isinstance(o, Deployment):
            pods += [
                PodPlan(
                    namespace=o.meta.namespace or "default",
                    name=f"{o.meta.name}-{i}",
                    node="",
                    labels=o.template_labels,
                    annotations=o.template_annotations,
                    spec=o.template,
                    owner=o.meta.name,
                    source=o,
                )
                for i in range(o.replicas)
            ]
    for o in objects:
        for wp in waypoint_pods(o):  # what the Gateway controller would deploy
            pods.append(wp)
            if (wp.namespace, wp.spec.service_account) not in sa_names:
                accounts.append(_implicit_account(wp.namespace, wp.spec.service_account))
                sa_names.add((wp.namespace, wp.spec.service_account))
    seen: dict[tuple[str, str], PodPlan] = {}
    node_set = {n.name for n in nodes}
    for p in pods:
        if (p.namespace, p.name) in seen:
            raise ManifestError(
                p.source.origin,
                p.source.ref,
                "metadata.name",
                f"pod {p.namespace}/{p.name} would exist twice (also from "
                f"{seen[(p.namespace, p.name)].source.ref})",
            )
        seen[(p.namespace, p.name)] = p
        spec_path = "spec.template.spec" if p.owner else "spec"
        if (p.namespace, p.spec.service_account) not in sa_names:
            raise ManifestError(
                p.source.origin,
                p.source.ref,
                f"{spec_path}.serviceAccountName",
                f"service account {p.spec.service_account!r} is not defined "
                f"in namespace {p.namespace!r}",
            )
        if p.spec.node_name is not None and p.spec.node_name not in node_set:
            raise ManifestError(
                p.source.origin,
                p.source.ref,
                f"{spec_path}.nodeName",
                f"no node {p.spec.node_name!r} in this lab (nodes: {', '.join(sorted(node_set))})",
            )

    services = allocate_vips([o for o in objects if isinstance(o, Service)])
    placed = schedule(pods, nodes)
    check_capacity(placed, nodes)
    return LabPlan(
        name=lab_name,
        nodes=nodes,
        namespaces=tuple(namespaces),
        service_accounts=tuple(accounts),
        deployments=tuple(o for o in objects if isinstance(o, Deployment)),
        pods=tuple(placed),
        services=tuple(services),
        others=tuple(o for o in objects if type(o) is Object),
    )


def _implicit_namespace(name: str) -> Namespace:
    raw = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    meta = Meta(name=name, namespace=None, labels={}, annotations={})
    return Namespace(kind="Namespace", api_version="v1", meta=meta, origin="(implicit)", raw=raw)


def _implicit_account(namespace: str, name: str = "default") -> ServiceAccount:
    """Every namespace has a `default` service account, as Kubernetes creates one (and the
    waypoint controller one per waypoint)."""
    raw = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }
    meta = Meta(name=name, namespace=namespace, labels={}, annotations={})
    return ServiceAccount(
        kind="ServiceAccount", api_version="v1", meta=meta, origin="(implicit)", raw=raw
    )


def waypoint_pods(o: Object) -> list[PodPlan]:
    """The pods a Gateway of class veil-waypoint gets (`veil.dev/replicas`, default 1):
    `veil waypoint` as service account <gateway>, not captured itself (it speaks HBONE),
    labelled with the gateway's name."""
    if o.kind != "Gateway" or (o.raw.get("spec") or {}).get("gatewayClassName") != WAYPOINT_CLASS:
        return []
    try:
        replicas = waypoint_replicas(o.meta.annotations) or 1
    except ValueError as e:
        raise ManifestError(
            o.origin, o.ref, f"metadata.annotations[{WAYPOINT_REPLICAS}]", str(e)
        ) from None
    return [waypoint_pod(o, i) for i in range(replicas)]


def waypoint_pod(o: Object, index: int = 0) -> PodPlan:
    ns, name = o.meta.namespace or "default", o.meta.name
    return PodPlan(
        namespace=ns,
        name=f"{name}-{index}",
        node="",
        labels={GATEWAY_NAME_LABEL: name, DATAPLANE_MODE: NONE},
        annotations={},
        spec=PodSpec(
            containers=(
                Container(
                    name="waypoint",
                    command=("veil", "waypoint", "--gateway", name, "--namespace", ns),
                    ports=(ContainerPort(HBONE_PORT, "mesh"),),
                ),
            ),
            service_account=name,
        ),
        owner=name,
        source=o,
    )


def pod_capacity(node: NodePlan) -> int:
    """Pod addresses a node's range gives (host-local from .10 to the last but broadcast)."""
    return node.pod_cidr.num_addresses - 10 - 1


def check_capacity(pods: Sequence[PodPlan], nodes: Sequence[NodePlan]) -> None:
    """Say before any bring-up (not minutes into it, at the first failed CNI ADD) that a node
    would hold more pods than its address range."""
    load: dict[str, int] = {}
    for p in pods:
        load[p.node] = load.get(p.node, 0) + 1
    for n in nodes:
        if load.get(n.name, 0) > (room := pod_capacity(n)):
            raise ValueError(
                f"{n.name} would hold {load[n.name]} pods, but its pod range {n.pod_cidr} has "
                f"room for {room} (from .10): add nodes (--nodes), give each node a larger "
                "range (--node-cidr-mask-size) or pin fewer pods to it"
            )


def schedule(pods: Iterable[PodPlan], nodes: Sequence[NodePlan]) -> list[PodPlan]:
    """Pinned pods go to their spec.nodeName; the others to the least loaded node.

    Ties go to the lower node index, so the same manifests always give the same placement,
    and a Deployment's replicas spread across nodes.
    """
    pods = list(pods)
    load = {n.name: 0 for n in nodes}
    for p in pods:
        if p.spec.node_name:
            load[p.spec.node_name] += 1
    out = []
    for p in pods:
        if p.spec.node_name:
            node = p.spec.node_name
        else:
            node = min(nodes, key=lambda n: (load[n.name], n.index)).name
            load[node] += 1
        out.append(
            PodPlan(
                namespace=p.namespace,
                name=p.name,
                node=node,
                labels=p.labels,
                annotations=p.annotations,
                spec=p.spec,
                owner=p.owner,
                source=p.source,
            )
        )
    return out


def allocate_vips(services: Sequence[Service]) -> list[ServicePlan]:
    """Explicit clusterIPs are honoured; the rest get the next free address from .10 on."""
    taken: dict[IPv4Address, Service] = {}
    for s in services:
        if s.cluster_ip is None:
            continue
        try:
            ip = IPv4Address(s.cluster_ip)
        except ipaddress.AddressValueError:
            raise ManifestError(
                s.origin, s.ref, "spec.clusterIP", f"{s.cluster_ip!r} is not an IPv4 address"
            ) from None
        if ip not in SERVICE_CIDR or ip in (
            SERVICE_CIDR.network_address,
            SERVICE_CIDR.broadcast_address,
        ):
            raise ManifestError(
                s.origin,
                s.ref,
                "spec.clusterIP",
                f"{ip} is outside the service range {SERVICE_CIDR}",
            )
        if ip in taken:
            raise ManifestError(
                s.origin, s.ref, "spec.clusterIP", f"{ip} is already used by {taken[ip].ref}"
            )
        taken[ip] = s
    free = (
        ip
        for ip in SERVICE_CIDR.hosts()
        if int(ip) - int(SERVICE_CIDR[0]) >= 10 and ip not in taken
    )
    out = []
    for s in services:
        ip = IPv4Address(s.cluster_ip) if s.cluster_ip else next(free)
        out.append(
            ServicePlan(
                namespace=s.meta.namespace or "default",
                name=s.meta.name,
                cluster_ip=ip,
                ports=s.ports,
                selector=s.selector,
                source=s,
            )
        )
    return out


def endpoints(
    service: ServicePlan,
    port: ServicePort,
    pods: Iterable[PodPlan],
    pod_ips: Mapping[tuple[str, str], IPv4Address],
    ready: Iterable[tuple[str, str]],
) -> list[Endpoint]:
    """Ready pods the service selects that have the port, sorted by pod name."""
    ready_set = set(ready)
    out = []
    for pod in pods:
        key = (pod.namespace, pod.name)
        if not service.selects(pod) or key not in ready_set or key not in pod_ips:
            continue
        target = service.target_port(port, pod)
        if target is not None:
            out.append(Endpoint(ip=pod_ips[key], port=target, pod=pod.name, node=pod.node))
    return sorted(out, key=lambda e: e.pod)


def render_hosts(pod: Named, pod_ip: IPv4Address, services: Iterable[VipService]) -> str:
    """/etc/hosts for one pod: its own name, and every service by the names DNS would give.

    The short name `<svc>` resolves only for services in the pod's own namespace, as the
    search path of a Kubernetes pod would.
    """
    lines = [
        "# written by veil lab; bind-mounted as /etc/hosts inside the pod's netns",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{pod.name}",
    ]
    for s in sorted(services, key=lambda s: (s.namespace, s.name)):
        names = [
            f"{s.name}.{s.namespace}",
            f"{s.name}.{s.namespace}.svc",
            f"{s.name}.{s.namespace}.svc.{CLUSTER_DOMAIN}",
        ]
        if s.namespace == pod.namespace:
            names.insert(0, s.name)
        lines.append(f"{s.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def render_resolv_conf(pod: Named) -> str:
    """/etc/resolv.conf for one pod: the Kubernetes search path, and no reachable DNS server.

    Names the lab knows are all in the pod's hosts file; anything else must fail at once
    (the pod's own loopback answers port 53 with ICMP unreachable) instead of waiting on the
    machine's DNS server, which a pod netns cannot reach.
    """
    search = f"{pod.namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return (
        f"# written by veil lab\nsearch {search}\nnameserver 127.0.0.1\n"
        "options ndots:5 timeout:1 attempts:1\n"
    )


MASQ_MARK = "0x4000/0x4000"


def chain_id(*parts: str) -> str:
    """A stable iptables chain suffix (chain names are limited to 28 characters)."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:12].upper()


def render_service_nat(
    services: Sequence[tuple[VipService, ServicePort, Sequence[Endpoint]]],
) -> str:
    """The nat table a node installs, as iptables-restore input (kube-proxy's iptables mode).

    VIP:port jumps to a per-service chain that picks an endpoint uniformly at random with the
    statistic match (1/n, 1/(n-1), ... 1). A pod reaching itself through its own VIP is
    masqueraded so the reply comes back through the node (hairpin). A VIP with no ready
    endpoint is rejected at once rather than left to time out.
    """
    head = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":VEIL-SERVICES - [0:0]",
        ":VEIL-POSTROUTING - [0:0]",
    ]
    rules = [
        '-A PREROUTING -m comment --comment "veil lab services" -j VEIL-SERVICES',
        '-A OUTPUT -m comment --comment "veil lab services" -j VEIL-SERVICES',
        "-A POSTROUTING -j VEIL-POSTROUTING",
        f"-A VEIL-POSTROUTING -m mark --mark {MASQ_MARK} -j MASQUERADE",
    ]
    filter_rules: list[str] = []
    for svc, port, eps in sorted(services, key=lambda t: (t[0].namespace, t[0].name, t[1].port)):
        name = f"{svc.namespace}/{svc.name}:{port.name or port.port}"
        match = f"-d {svc.cluster_ip}/32 -p tcp -m tcp --dport {port.port}"
        if not eps:
            filter_rules.append(
                f'-A VEIL-SERVICES {match} -m comment --comment "{name} has '
                'no endpoints" -j REJECT --reject-with tcp-reset'
            )
            continue
        svc_chain = f"VEIL-SVC-{chain_id(name)}"
        head.append(f":{svc_chain} - [0:0]")
        rules.append(f'-A VEIL-SERVICES {match} -m comment --comment "{name}" -j {svc_chain}')
        for i, ep in enumerate(eps):
            sep = f"VEIL-SEP-{chain_id(name, ep.pod, str(ep.ip), str(ep.port))}"
            head.append(f":{sep} - [0:0]")
            left = len(eps) - i
            pick = "" if left == 1 else f"-m statistic --mode random --probability {1 / left:.11f} "
            rules.append(f'-A {svc_chain} -m comment --comment "{name} -> {ep.pod}" {pick}-j {sep}')
            rules += [
                f"-A {sep} -s {ep.ip}/32 -j MARK --set-xmark {MASQ_MARK}",
                f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep.ip}:{ep.port}",
            ]
    out = [*head, *rules, "COMMIT"]
    out += [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":VEIL-SERVICES - [0:0]",
        "-A INPUT -j VEIL-SERVICES",
        "-A FORWARD -j VEIL-SERVICES",
        "-A OUTPUT -j VEIL-SERVICES",
        *filter_rules,
        "COMMIT",
    ]
    return "\n".join(out) + "\n"
