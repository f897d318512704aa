"""Kubernetes manifests the lab accepts, parsed and validated before anything is created.

The lab acts as the API server, so it checks what an API server would: every object needs a
kind, a valid name and the fields of its kind with the right types. An error names the file,
the object and the field, so a user can fix the YAML without guessing. Kinds the lab does not
run itself (Gateway, HTTPRoute, AuthorizationPolicy, ...) are kept as given for later
consumers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

# Kinds that live outside any namespace.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "GatewayClass",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
    }
)
# Kinds the lab runs itself; everything else is stored for later consumers.
RUN_KINDS = frozenset({"Namespace", "ServiceAccount", "Pod", "Deployment", "Service"})


class ManifestError(ValueError):
    """A manifest the lab refuses: names the file, the object and the field."""

    def __init__(self, origin: str, obj: str, path: str, message: str) -> None:
        self.origin, self.obj, self.path, self.message = origin, obj, path, message
        where = f"{obj}: {path}" if path else obj
        super().__init__(f"{origin}: {where}: {message}")


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    name: str | None = None


@dataclass(frozen=True)
class Container:
    name: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True)
class PodSpec:
    containers: tuple[Container, ...]
    node_name: str | None = None
    service_account: str = "default"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str | None = None
    protocol: str = "TCP"


@dataclass(frozen=True)
class Object:
    """One accepted manifest document. `raw` is the document as written, for the state store."""

    kind: str
    api_version: str
    meta: Meta
    origin: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.meta.namespace, self.meta.name)

    @property
    def ref(self) -> str:
        ns = f"{self.meta.namespace}/" if self.meta.namespace else ""
        return f"{self.kind} {ns}{self.meta.name}"


@dataclass(frozen=True)
class Namespace(Object):
    pass


@dataclass(frozen=True)
class ServiceAccount(Object):
    pass


@dataclass(frozen=True)
class Pod(Object):
    spec: PodSpec = field(default_factory=lambda: PodSpec(containers=()))


@dataclass(frozen=True)
class Deployment(Object):
    replicas: int = 1
    selector: Mapping[str, str] = field(default_factory=dict)
    template_labels: Mapping[str, str] = field(default_factory=dict)
    template_annotations: Mapping[str, str] = field(default_factory=dict)
    template: PodSpec = field(default_factory=lambda: PodSpec(containers=()))


@dataclass(frozen=True)
class Service(Object):
    cluster_ip: str | None = None
    selector: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ServicePort, ...] = ()


class _Doc:
    """Typed field access on one document, turning every mistake into a ManifestError."""

    def __init__(self, origin: str, obj: str) -> None:
        self.origin, self.obj = origin, obj

    def fail(self, path: str, message: str) -> ManifestError:
        return ManifestError(self.origin, self.obj, path, message)

    def get(
        self, m: Mapping[str, Any], key: str, typ: type, path: str, required: bool = False
    ) -> Any:
        value = m.get(key)
        where = f"{path}.{key}" if path else key
        if value is None:
            if required:
                raise self.fail(where, "required field is missing")
            return None
        # bool is an int in Python, never in Kubernetes.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise self.fail(where, f"expected {_TYPE_NAMES[typ]}, got {_describe(value)}")
        return value

    def mapping(
        self, m: Mapping[str, Any], key: str, path: str, required: bool = False
    ) -> Mapping[str, Any]:
        value = self.get(m, key, dict, path, required)
        return value if value is not None else {}

    def items(self, m: Mapping[str, Any], key: str, path: str, required: bool = False) -> list[Any]:
        value = self.get(m, key, list, path, required)
        return value if value is not None else []

    def string_map(
        self, m: Mapping[str, Any], key: str, path: str, label_syntax: bool = False
    ) -> dict[str, str]:
        where = f"{path}.{key}" if path else key
        out: dict[str, str] = {}
        for k, v in self.mapping(m, key, path).items():
            if not isinstance(k, str):
                raise self.fail(where, f"keys must be strings, got {_describe(k)}")
            if not isinstance(v, str):
                raise self.fail(
                    f"{where}.{k}", f"expected a string, got {_describe(v)} (quote it in YAML)"
                )
            if label_syntax and not LABEL_KEY.match(k):
                raise self.fail(f"{where}.{k}", "invalid label key")
            if label_syntax and (len(v) > 63 or not LABEL_VALUE.match(v)):
                raise self.fail(f"{where}.{k}", f"invalid label value {v!r}")
            out[k] = v
        return out

    def port(self, m: Mapping[str, Any], key: str, path: str, required: bool = False) -> Any:
        value = self.get(m, key, int, path, required)
        if value is not None and not 1 <= value <= 65535:
            raise self.fail(f"{path}.{key}", f"port {value} is outside 1-65535")
        return value


_TYPE_NAMES = {str: "a string", int: "an integer", dict: "a mapping", list: "a list"}


def _describe(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return f"{names.get(type(value), type(value).__name__)} ({value!r:.40})"


def load_paths(paths: Iterable[str | Path]) -> list[Object]:
    """Read every .yaml/.yml file under the given files or directories, in name order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml"))
        elif p.exists():
            files.append(p)
        else:
            raise ManifestError(str(p), "file", "", "no such file or directory")
    if not files:
        raise ManifestError(", ".join(map(str, paths)), "manifests", "", "no .yaml files found")
    objects: list[Object] = []
    for f in files:
        objects += parse_text(f.read_text(), str(f))
    check_unique(objects)
    return objects


def parse_text(text: str, filename: str) -> list[Object]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "document"
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(filename, where, "", f"invalid YAML: {problem}") from None
    out = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        out.append(parse_object(doc, f"{filename}#{i}"))
    return out


def parse_object(doc: Any, origin: str) -> Object:
    d = _Doc(origin, "document")
    if not isinstance(doc, dict):
        raise d.fail("", f"expected a Kubernetes object (a mapping), got {_describe(doc)}")
    kind = d.get(doc, "kind", str, "", required=True)
    api_version = d.get(doc, "apiVersion", str, "", required=True)
    md = d.mapping(doc, "metadata", "", required=True)
    name = d.get(md, "name", str, "metadata", required=True)
    namespace = d.get(md, "namespace", str, "metadata")
    if kind in CLUSTER_SCOPED:
        if namespace is not None:
            raise d.fail("metadata.namespace", f"{kind} is cluster-scoped and takes no namespace")
    else:
        namespace = namespace or "default"
    d.obj = f"{kind} {namespace + '/' if namespace else ''}{name}"
    name_rule = DNS_LABEL if kind in ("Namespace", "Service") else DNS_SUBDOMAIN
    if len(name) > (63 if name_rule is DNS_LABEL else 253) or not name_rule.match(name):
        raise d.fail(
            "metadata.name",
            f"{name!r} is not a valid {kind} name "
            "(lowercase letters, digits and '-', starting and ending alphanumeric)",
        )
    if namespace is not None and (len(namespace) > 63 or not DNS_LABEL.match(namespace)):
        raise d.fail("metadata.namespace", f"{namespace!r} is not a valid namespace name")
    meta = Meta(
        name=name,
        namespace=namespace,
        labels=d.string_map(md, "labels", "metadata", label_syntax=True),
        annotations=d.string_map(md, "annotations", "metadata"),
    )
    base: dict[str, Any] = {
        "kind": kind,
        "api_version": api_version,
        "meta": meta,
        "origin": origin,
        "raw": doc,
    }
    if kind not in RUN_KINDS:
        return Object(**base)
    if kind in ("Namespace", "ServiceAccount", "Service", "Deployment", "Pod"):
        want = "apps/v1" if kind == "Deployment" else "v1"
        if api_version != want:
            raise d.fail("apiVersion", f"{kind} needs apiVersion {want!r}, got {api_version!r}")
    if kind == "Namespace":
        return Namespace(**base)
    if kind == "ServiceAccount":
        return ServiceAccount(**base)
    spec = d.mapping(doc, "spec", "", required=True)
    if kind == "Pod":
        return Pod(**base, spec=_pod_spec(d, spec, "spec"))
    if kind == "Deployment":
        return _deployment(d, base, spec)
    return _service(d, base, spec)


def _pod_spec(d: _Doc, spec: Mapping[str, Any], path: str) -> PodSpec:
    containers = []
    raw_containers = d.items(spec, "containers", path, required=True)
    if not raw_containers:
        raise d.fail(f"{path}.containers", "a pod needs at least one container")
    seen_ports: set[int] = set()
    for i, c in enumerate(raw_containers):
        cpath = f"{path}.containers[{i}]"
        if not isinstance(c, dict):
            raise d.fail(cpath, f"expected a mapping, got {_describe(c)}")
        cname = d.get(c, "name", str, cpath, required=True)
        command = [*d.items(c, "command", cpath), *d.items(c, "args", cpath)]
        if not command:
            raise d.fail(
                f"{cpath}.command",
                "the lab runs processes on this machine, not "
                "images: give the container a command (e.g. [veil, echo])",
            )
        for j, word in enumerate(command):
            if not isinstance(word, str):
                raise d.fail(f"{cpath}.command[{j}]", f"expected a string, got {_describe(word)}")
        env = []
        for j, e in enumerate(d.items(c, "env", cpath)):
            epath = f"{cpath}.env[{j}]"
            if not isinstance(e, dict):
                raise d.fail(epath, f"expected a mapping, got {_describe(e)}")
            env.append(
                (d.get(e, "name", str, epath, required=True), d.get(e, "value", str, epath) or "")
            )
        ports = []
        for j, p in enumerate(d.items(c, "ports", cpath)):
            ppath = f"{cpath}.ports[{j}]"
            if not isinstance(p, dict):
                raise d.fail(ppath, f"expected a mapping, got {_describe(p)}")
            number = d.port(p, "containerPort", ppath, required=True)
            protocol = d.get(p, "protocol", str, ppath) or "TCP"
            if protocol != "TCP":
                raise d.fail(f"{ppath}.protocol", f"only TCP is supported, got {protocol!r}")
            if number in seen_ports:
                raise d.fail(f"{ppath}.containerPort", f"port {number} is declared twice")
            seen_ports.add(number)
            ports.append(ContainerPort(container_port=number, name=d.get(p, "name", str, ppath)))
        containers.append(
            Container(name=cname, command=tuple(command), env=tuple(env), ports=tuple(ports))
        )
    sa = d.get(spec, "serviceAccountName", str, path) or "default"
    if not DNS_SUBDOMAIN.match(sa):
        raise d.fail(f"{path}.serviceAccountName", f"{sa!r} is not a valid name")
    return PodSpec(
        containers=tuple(containers),
        node_name=d.get(spec, "nodeName", str, path),
        service_account=sa,
    )


def _deployment(d: _Doc, base: dict[str, Any], spec: Mapping[str, Any]) -> Deployment:
    replicas = d.get(spec, "replicas", int, "spec")
    replicas = 1 if replicas is None else replicas
    if replicas < 0:
        raise d.fail("spec.replicas", f"must be 0 or more, got {replicas}")
    selector = d.mapping(spec, "selector", "spec", required=True)
    match = d.string_map(selector, "matchLabels", "spec.selector", label_syntax=True)
    if not match:
        raise d.fail("spec.selector.matchLabels", "a Deployment needs a label selector")
    template = d.mapping(spec, "template", "spec", required=True)
    tmeta = d.mapping(template, "metadata", "spec.template")
    labels = d.string_map(tmeta, "labels", "spec.template.metadata", label_syntax=True)
    if any(labels.get(k) != v for k, v in match.items()):
        raise d.fail(
            "spec.template.metadata.labels", "must carry every label of spec.selector.matchLabels"
        )
    tspec = d.mapping(template, "spec", "spec.template", required=True)
    return Deployment(
        **base,
        replicas=replicas,
        selector=match,
        template_labels=labels,
        template_annotations=d.string_map(tmeta, "annotations", "spec.template.metadata"),
        template=_pod_spec(d, tspec, "spec.template.spec"),
    )


def _service(d: _Doc, base: dict[str, Any], spec: Mapping[str, Any]) -> Service:
    stype = d.get(spec, "type", str, "spec") or "ClusterIP"
    if stype != "ClusterIP":
        raise d.fail("spec.type", f"the lab supports ClusterIP services only, got {stype!r}")
    cluster_ip = d.get(spec, "clusterIP", str, "spec")
    if cluster_ip == "None":
        raise d.fail("spec.clusterIP", "headless services are not supported by the lab")
    ports = []
    raw_ports = d.items(spec, "ports", "spec", required=True)
    if not raw_ports:
        raise d.fail("spec.ports", "a Service needs at least one port")
    for i, p in enumerate(raw_ports):
        ppath = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise d.fail(ppath, f"expected a mapping, got {_describe(p)}")
        port = d.port(p, "port", ppath, required=True)
        target = p.get("targetPort", port)
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise d.fail(
                f"{ppath}.targetPort", f"expected a port number or name, got {_describe(target)}"
            )
        if isinstance(target, int) and not 1 <= target <= 65535:
            raise d.fail(f"{ppath}.targetPort", f"port {target} is outside 1-65535")
        protocol = d.get(p, "protocol", str, ppath) or "TCP"
        if protocol != "TCP":
            raise d.fail(f"{ppath}.protocol", f"only TCP is supported, got {protocol!r}")
        name = d.get(p, "name", str, ppath)
        if len(raw_ports) > 1 and not name:
            raise d.fail(f"{ppath}.name", "required when a Service has more than one port")
        ports.append(ServicePort(port=port, target_port=target, name=name, protocol=protocol))
    if len({p.port for p in ports}) != len(ports):
        raise d.fail("spec.ports", "the same port is declared twice")
    return Service(
        **base,
        cluster_ip=cluster_ip,
        ports=tuple(ports),
        selector=d.string_map(spec, "selector", "spec", label_syntax=True),
    )


def check_unique(objects: Iterable[Object]) -> None:
    seen: dict[tuple[str, str | None, str], Object] = {}
    for o in objects:
        if o.key in seen:
            raise ManifestError(
                o.origin, o.ref, "metadata.name", f"already defined in {seen[o.key].origin}"
            )
        seen[o.key] = o
