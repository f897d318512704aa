"""What the lab's kubelet makes of a Pod from the API server (pure functions): the program a
container's image runs, its environment, the volumes to write and where they are mounted,
and the status to report. lab/kubelet.py does the I/O around them.

Images: the lab has no container engine, so an image only names which local program runs.

- Veil's own images (a repository named `veil`, e.g. `ghcr.io/veil-dev/veil:0.1`, or any
  under `veil/`, e.g. `veil/echo`) run from the project's venv; their entrypoint is `veil`.
- Any other image runs its `command` on the host's filesystem (it must give one).

Either way the process gets the pod's network (its netns, or the node's for `hostNetwork`)
and a private mount namespace in which the pod's volumes, /etc/hosts and /etc/resolv.conf
are bind-mounted at their paths; the rest of the filesystem is the host's.
"""

from __future__ import annotations

import base64
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

API_SERVICE_HOST, API_SERVICE_PORT = "10.96.0.1", "443"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TOKEN_SECONDS = 3607  # what the ServiceAccount admission plugin asks for
HOST_PATH_TYPES = frozenset(
    {"", "DirectoryOrCreate", "Directory", "File", "Socket", "FileOrCreate"}
)


class PodError(ValueError):
    """A pod the lab cannot start as given; `reason` is what the kubelet would report
    (CreateContainerConfigError, ...), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# What the kubelet can look up: ("ConfigMap" | "Secret", name) -> its data (Secret values
# already decoded), or None when there is no such object.
Lookup = Callable[[str, str], Mapping[str, str] | None]


def key(pod: Mapping[str, Any]) -> tuple[str, str]:
    md = pod["metadata"]
    return md.get("namespace", "default"), md["name"]


# -- images and commands ----------------------------------------------------------------------


def image_repository(image: str) -> str:
    """`ghcr.io/veil-dev/veil:0.1@sha256:..` -> `veil-dev/veil` (no registry, tag or digest)."""
    name = image.split("@", 1)[0]
    head, sep, last = name.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    parts = [*(head.split("/") if sep else []), last]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts)


def is_veil_image(image: str) -> bool:
    parts = image_repository(image).split("/")
    return parts[0] == "veil" or parts[-1] == "veil"


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` in command and args: a defined variable is replaced, `$$` is `$`,
    anything else stays as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    image = str(container.get("image", ""))
    if not command:
        if not is_veil_image(image):
            raise PodError(
                "CreateContainerError",
                f"container {container.get('name')}: image {image!r} has no entrypoint the lab "
                "knows (it runs commands on the host; give the container a `command`)",
            )
        command = ["veil"]
    return [expand(str(a), env) for a in command + args]


# -- environment ------------------------------------------------------------------------------


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """The downward API's `fieldRef.fieldPath`."""
    md, spec = pod["metadata"], pod.get("spec", {})
    simple = {
        "metadata.name": md.get("name", ""),
        "metadata.namespace": md.get("namespace", "default"),
        "metadata.uid": md.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = md.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodError("CreateContainerConfigError", f"fieldRef {path!r} is not supported")


def _ref(kind: str, ref: Mapping[str, Any], lookup: Lookup) -> Mapping[str, str] | None:
    data = lookup(kind, str(ref.get("name", "")))
    if data is None and not ref.get("optional"):
        raise PodError(
            "CreateContainerConfigError", f"{kind.lower()} {ref.get('name')!r} not found"
        )
    return data


def container_env(  # noqa: PLR0917
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    host_ip: str,
    lookup: Lookup,
    path: str,
) -> dict[str, str]:
    """The environment the kubelet gives a container: the API Service's address and the
    pod's facts that the lab's manifest mode gives every container too (POD_NAME, ...), then
    `envFrom` in order, then `env` (later wins; `$(VAR)` refers to earlier ones)."""
    md, spec = pod["metadata"], pod.get("spec", {})
    env = {
        "PATH": path,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "HOSTNAME": str(md["name"]),
        "POD_NAME": str(md["name"]),
        "POD_NAMESPACE": str(md.get("namespace", "default")),
        "POD_IP": pod_ip,
        "NODE_NAME": str(spec.get("nodeName", "")),
        "POD_SERVICE_ACCOUNT": str(spec.get("serviceAccountName") or "default"),
        "KUBERNETES_SERVICE_HOST": API_SERVICE_HOST,
        "KUBERNETES_SERVICE_PORT": API_SERVICE_PORT,
        "KUBERNETES_SERVICE_PORT_HTTPS": API_SERVICE_PORT,
    }
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if field in source:
                found = _ref(kind, source[field], lookup) or {}
                env |= {prefix + k: v for k, v in found.items()}
    for var in container.get("env") or []:
        name = str(var["name"])
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_value(pod, str(source["fieldRef"]["fieldPath"]), pod_ip, host_ip)
            continue
        for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if field in source:
                ref = source[field]
                data = _ref(kind, ref, lookup)
                if data is not None and ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise PodError(
                        "CreateContainerConfigError",
                        f"{kind.lower()} {ref.get('name')!r} has no key {ref['key']!r}",
                    )
                break
        else:
            raise PodError(
                "CreateContainerConfigError",
                f"env {name}: only value, fieldRef, configMapKeyRef and secretKeyRef are "
                "supported by the lab",
            )
    return env


# -- volumes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSpec:
    """A projected service-account token the kubelet must request (TokenRequest API)."""

    volume: str
    path: str
    audience: str | None
    seconds: int


@dataclass(frozen=True)
class Volume:
    """One pod volume as the lab provides it: a host path bound as is, or a directory the
    kubelet fills with `files` (path -> content, mode)."""

    name: str
    host_path: str | None = None
    host_path_type: str = ""
    files: Mapping[str, tuple[bytes, int]] | None = None


# The machine's own views, which every lab node shares: kernel file systems and the named
# network namespaces (a node's agent finds its pods' there).
SHARED_HOST_PATHS = ("/proc", "/sys", "/dev", "/run/netns", "/var/run/netns")


def node_host_path(path: str, node_root: str) -> str:
    """Where a hostPath is on a lab node. The lab's nodes share one machine, so what a node
    keeps of its own (`/var/run/veil`, `/opt/cni/bin`, ...) lives under the node's root; the
    shared views above are the machine's."""
    norm = posixpath.normpath("/" + path.lstrip("/"))
    if any(norm == p or norm.startswith(p + "/") for p in SHARED_HOST_PATHS):
        return norm
    return node_root.rstrip("/") + norm


def cluster_dns(pod: Mapping[str, Any]) -> bool:
    """Whether the pod resolves cluster names (a hostNetwork pod only if it asks)."""
    spec = pod.get("spec") or {}
    if not spec.get("hostNetwork"):
        return spec.get("dnsPolicy") != "Default"
    return spec.get("dnsPolicy") == "ClusterFirstWithHostNet"


def nested(mounts: Sequence[Mount], i: int) -> bool:
    """Whether mount i lands inside an earlier mount's target (its mount point is then made
    in that volume, not on the host)."""
    target = mounts[i].target.rstrip("/")
    return any(target.startswith(m.target.rstrip("/") + "/") for m in mounts[:i])


@dataclass(frozen=True)
class Mount:
    source: str  # a host path
    target: str
    read_only: bool


def token_specs(pod: Mapping[str, Any]) -> list[TokenSpec]:
    out = []
    for v in pod.get("spec", {}).get("volumes") or []:
        for s in (v.get("projected") or {}).get("sources") or []:
            if "serviceAccountToken" in s:
                t = s["serviceAccountToken"]
                out.append(
                    TokenSpec(
                        v["name"],
                        str(t["path"]),
                        t.get("audience"),
                        int(t.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
                    )
                )
    return out


def _items(
    data: Mapping[str, str], items: Sequence[Mapping[str, Any]] | None, mode: int, what: str
) -> dict[str, tuple[bytes, int]]:
    if not items:
        return {k: (v.encode(), mode) for k, v in data.items()}
    out = {}
    for item in items:
        if item["key"] not in data:
            raise PodError("CreateContainerConfigError", f"{what} has no key {item['key']!r}")
        out[str(item["path"])] = (data[item["key"]].encode(), int(item.get("mode", mode)))
    return out


def _object_files(
    kind: str, ref: Mapping[str, Any], name_field: str, lookup: Lookup, mode: int
) -> dict[str, tuple[bytes, int]]:
    name = str(ref.get(name_field, ""))
    data = lookup(kind, name)
    if data is None:
        if ref.get("optional"):
            return {}
        raise PodError("CreateContainerConfigError", f"{kind.lower()} {name!r} not found")
    return _items(data, ref.get("items"), mode, f"{kind.lower()} {name!r}")


def _downward_files(
    pod: Mapping[str, Any], items: Sequence[Mapping[str, Any]], mode: int, ips: tuple[str, str]
) -> dict[str, tuple[bytes, int]]:
    out = {}
    for item in items:
        if "fieldRef" not in item:
            raise PodError("CreateContainerConfigError", "downwardAPI: only fieldRef is supported")
        value = field_value(pod, str(item["fieldRef"]["fieldPath"]), *ips)
        out[str(item["path"])] = (value.encode(), int(item.get("mode", mode)))
    return out


def volumes(
    pod: Mapping[str, Any],
    lookup: Lookup,
    tokens: Mapping[tuple[str, str], str],
    ips: tuple[str, str],
) -> list[Volume]:
    """Every volume of the pod, its files resolved (`tokens`: (volume, path) -> token)."""
    out = []
    for v in pod.get("spec", {}).get("volumes") or []:
        name = str(v["name"])
        if "emptyDir" in v:
            out.append(Volume(name, files={}))
        elif "hostPath" in v:
            kind = str(v["hostPath"].get("type") or "")
            if kind not in HOST_PATH_TYPES:
                raise PodError(
                    "CreateContainerConfigError", f"volume {name}: hostPath type {kind!r}"
                )
            out.append(Volume(name, host_path=str(v["hostPath"]["path"]), host_path_type=kind))
        elif "configMap" in v:
            ref = v["configMap"]
            mode = int(ref.get("defaultMode", 0o644))
            out.append(Volume(name, files=_object_files("ConfigMap", ref, "name", lookup, mode)))
        elif "secret" in v:
            ref = v["secret"]
            mode = int(ref.get("defaultMode", 0o644))
            secret = _object_files("Secret", ref, "secretName", lookup, mode)
            out.append(Volume(name, files=secret))
        elif "downwardAPI" in v:
            ref = v["downwardAPI"]
            mode = int(ref.get("defaultMode", 0o644))
            out.append(Volume(name, files=_downward_files(pod, ref.get("items") or [], mode, ips)))
        elif "projected" in v:
            mode = int(v["projected"].get("defaultMode", 0o644))
            files: dict[str, tuple[bytes, int]] = {}
            for s in v["projected"].get("sources") or []:
                if "serviceAccountToken" in s:
                    path = str(s["serviceAccountToken"]["path"])
                    files[path] = (tokens[(name, path)].encode(), mode)
                elif "configMap" in s:
                    files |= _object_files("ConfigMap", s["configMap"], "name", lookup, mode)
                elif "secret" in s:
                    files |= _object_files("Secret", s["secret"], "name", lookup, mode)
                elif "downwardAPI" in s:
                    files |= _downward_files(pod, s["downwardAPI"].get("items") or [], mode, ips)
                else:
                    raise PodError(
                        "CreateContainerConfigError",
                        f"volume {name}: projected source {sorted(s)} is not supported",
                    )
            out.append(Volume(name, files=files))
        else:
            kinds = sorted(k for k in v if k != "name")
            raise PodError(
                "CreateContainerConfigError",
                f"volume {name}: {', '.join(kinds) or 'no source'} is not supported by the lab "
                "(emptyDir, hostPath, configMap, secret, downwardAPI and projected are)",
            )
    return out


def decode_secret(data: Mapping[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


def mounts(container: Mapping[str, Any], volume_path: Mapping[str, str]) -> list[Mount]:
    """The container's volumeMounts as host-path binds (`volume_path`: volume -> host path)."""
    out = []
    for m in container.get("volumeMounts") or []:
        name = str(m["name"])
        if name not in volume_path:
            raise PodError(
                "CreateContainerConfigError", f"volumeMount {name!r}: the pod has no such volume"
            )
        source = volume_path[name]
        if sub := str(m.get("subPath") or ""):
            if sub.startswith("/") or ".." in sub.split("/"):
                raise PodError("CreateContainerConfigError", f"subPath {sub!r} leaves its volume")
            source = f"{source.rstrip('/')}/{sub}"
        out.append(Mount(source, str(m["mountPath"]), bool(m.get("readOnly"))))
    return out


# -- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerState:
    name: str
    image: str
    running: bool
    ready: bool
    restarts: int
    started_at: str | None
    exit_code: int | None = None
    waiting_reason: str | None = None
    waiting_message: str = ""
    container_id: str = ""


def phase(policy: str, containers: Sequence[ContainerState], started: bool) -> str:
    """Pending until started; Running while a container runs or will be restarted;
    Succeeded / Failed once every container has ended for good."""
    if not started or any(c.waiting_reason for c in containers):
        return "Pending"
    if any(c.running for c in containers):
        return "Running"
    codes = [c.exit_code or 0 for c in containers]
    if policy == "Always" or (policy == "OnFailure" and any(codes)):
        return "Running"  # ended, about to be restarted
    return "Succeeded" if not any(codes) else "Failed"


def _container_status(c: ContainerState) -> dict[str, Any]:
    state: dict[str, Any]
    if c.waiting_reason:
        state = {"waiting": {"reason": c.waiting_reason, "message": c.waiting_message}}
    elif c.running:
        state = {"running": {"startedAt": c.started_at}}
    else:
        state = {
            "terminated": {
                "exitCode": c.exit_code or 0,
                "reason": "Completed" if not c.exit_code else "Error",
                "startedAt": c.started_at,
            }
        }
    return {
        "name": c.name,
        "image": c.image,
        "imageID": "",
        "containerID": f"veil-lab://{c.container_id}" if c.container_id else "",
        "ready": c.ready,
        "started": c.running,
        "restartCount": c.restarts,
        "state": state,
    }


def pod_status(  # noqa: PLR0917
    pod: Mapping[str, Any],
    pod_ip: str | None,
    host_ip: str,
    started_at: str,
    containers: Sequence[ContainerState],
    started: bool,
) -> dict[str, Any]:
    """The pod's `status` as the kubelet reports it."""
    policy = str(pod.get("spec", {}).get("restartPolicy") or "Always")
    ph = phase(policy, containers, started)
    ready = started and bool(containers) and all(c.ready for c in containers)

    def cond(kind: str, ok: bool) -> dict[str, Any]:
        return {"type": kind, "status": "True" if ok else "False"}

    status: dict[str, Any] = {
        "phase": ph,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": started_at,
        "conditions": [
            cond("PodReadyToStartContainers", started),
            cond("Initialized", True),
            cond("ContainersReady", ready),
            cond("Ready", ready),
            cond("PodScheduled", True),
        ],
        "containerStatuses": [_container_status(c) for c in containers],
    }
    if pod_ip:
        status |= {"podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
    return status


def ready_ports(container: Mapping[str, Any]) -> set[int]:
    """Ports that must listen before the container counts as ready: its declared
    containerPorts, and a readiness probe's tcpSocket/httpGet port (by number or name)."""
    named = {str(p.get("name")): int(p["containerPort"]) for p in container.get("ports") or []}
    ports = set(named.values())
    probe = container.get("readinessProbe") or {}
    for kind in ("tcpSocket", "httpGet"):
        if kind in probe:
            port = probe[kind].get("port")
            if isinstance(port, int):
                ports.add(port)
            elif str(port) in named:
                ports.add(named[str(port)])
            elif str(port).isdigit():
                ports.add(int(str(port)))
    return ports
