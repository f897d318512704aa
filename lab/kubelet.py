"""The lab as the kubelet of one node (kubernetes mode), with the node's own credentials
(`system:node:<node>`, so the API server's Node authorizer and NodeRestriction judge it as
they would a real kubelet):

- it registers the Node, keeps it Ready with a status heartbeat and renews its Lease;
- it watches the pods bound to the node, and runs each one with a pod worker (a thread, as
  the kubelet's pod workers): a netns through the node's CNI chain (veil-cni included), the
  volumes written under the pod's directory (projected service-account tokens from the
  TokenRequest API, ConfigMaps, Secrets, downward API, emptyDir, hostPath), each container's
  command in a private mount namespace with them (lab/mounts.py), restarts per the pod's
  restartPolicy, and the pod's status (podIP, phase, conditions, container states) reported
  through the API; deletion honours the grace period (SIGTERM, then SIGKILL, then CNI DEL);
- as kube-proxy (its own credentials, `system:kube-proxy`), it follows Services and
  EndpointSlices and installs the node's service NAT, and rewrites its pods' /etc/hosts.

What each pod becomes is decided by lab/pods.py (pure). A restarted kubelet removes the pods
it ran before (its registry under `<lab dir>/kubelet/<node>/`) and starts them afresh.

Runs as `python -m veil.lab.kubelet LAB NODE INDEX MASK` in the node's netns, supervised.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from lightkube import ApiError, Client, KubeConfig
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.core_v1 import NodeSpec, Taint
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, Secret, Service, ServiceAccount
from lightkube.resources.discovery_v1 import EndpointSlice

from veil.lab import cgroups, netns, pods, store
from veil.lab.cni import LOOPBACK_CONFIG, Attachment, CniError, result_ip
from veil.lab.manifests import ServicePort
from veil.lab.plan import (
    Endpoint,
    NodePlan,
    render_hosts,
    render_resolv_conf,
    render_service_nat,
)

log = logging.getLogger("veil.lab.kubelet")


def controlplane_node_dir(lab: str, node: str) -> Path:
    from veil.lab.controlplane import node_dir  # noqa: PLC0415

    return node_dir(lab, node)


HEARTBEAT = 10.0  # seconds, the kubelet's nodeLeaseRenewIntervalFraction of 40 s
LEASE_SECONDS = 40
CAPACITY = {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"}
TICK = 1.0  # a pod worker looks at its processes this often (and at once on a change)
RESTART_BACKOFF = (1.0, 30.0)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    """A MicroTime, as a Lease's renewTime must be."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_status(ip: str) -> dict[str, Any]:
    t = now()
    return {
        "status": {
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "veil lab kubelet is posting ready status",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                }
            ],
            "nodeInfo": {
                "kubeletVersion": "v0.0.0-veil-lab",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "veil-lab://0",
                "kernelVersion": "",
                "osImage": "veil lab",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
    }


def register(
    client: Client, node: str, ip: str, pod_cidr: str, taints: Sequence[Taint] = ()
) -> None:
    """Create the Node (or find it, after a restart) and post its status. `taints`: as the
    kubelet's --register-with-taints (set at creation only)."""
    try:
        client.create(
            Node(
                metadata=ObjectMeta(
                    name=node,
                    labels={
                        "kubernetes.io/hostname": node,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                    },
                ),
                spec=NodeSpec(podCIDR=pod_cidr, podCIDRs=[pod_cidr], taints=list(taints) or None),
            )
        )
        log.info("node %s registered", node)
    except ApiError as e:
        if e.status.code != 409:
            raise
    client.patch(Node.Status, node, node_status(ip))


def renew(client: Client, node: str) -> None:
    """Renew the node's Lease in kube-node-lease (create it the first time)."""
    spec = {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
    try:
        client.patch(Lease, node, {"spec": spec}, namespace="kube-node-lease")
    except ApiError as e:
        if e.status.code != 404:
            raise
        client.create(
            Lease(
                metadata=ObjectMeta(name=node, namespace="kube-node-lease"),
                spec=LeaseSpec(
                    holderIdentity=node,
                    leaseDurationSeconds=LEASE_SECONDS,
                    renewTime=datetime.datetime.now(datetime.UTC),
                ),
            )
        )


def heartbeat(
    client: Client, node: NodePlan, stop: threading.Event, taints: Sequence[Taint] = ()
) -> None:
    registered = False
    last_status = 0.0
    while not stop.is_set():
        try:
            if not registered:
                register(client, node.name, str(node.underlay_ip), str(node.pod_cidr), taints)
                registered, last_status = True, time.monotonic()
            renew(client, node.name)
            if time.monotonic() - last_status >= 4 * HEARTBEAT:  # status every 40 s
                client.patch(Node.Status, node.name, node_status(str(node.underlay_ip)))
                last_status = time.monotonic()
        except Exception as e:  # the API server restarting, a timeout: try again next beat
            log.warning("heartbeat of node %s failed: %s", node.name, e)
        stop.wait(HEARTBEAT)


def follow(
    client: Client,
    resource: Any,
    on_change: Callable[[dict[str, dict[str, Any]]], None],
    stop: threading.Event,
    fields: dict[str, Any] | None = None,
) -> None:
    """List, then watch, `resource` in every namespace; `on_change` gets every object held
    (by uid) after each change. A watch that ends or fails lists again (after 1 s)."""
    while not stop.is_set():
        try:
            items = client.list(resource, namespace="*", fields=fields)
            held = {o.metadata.uid: o.to_dict() for o in items}
            on_change(dict(held))
            for op, obj in client.watch(
                resource,
                namespace="*",
                fields=fields,
                resource_version=items.resourceVersion,
                server_timeout=300,
            ):
                if stop.is_set():
                    return
                if op == "DELETED":
                    held.pop(obj.metadata.uid, None)
                else:
                    held[obj.metadata.uid] = obj.to_dict()
                on_change(dict(held))
        except Exception as e:
            log.warning("%s: %s (listing again)", resource.__name__, e)
        stop.wait(1.0)


# -- running one pod --------------------------------------------------------------------------


@dataclass
class Container:
    name: str
    image: str
    spec: Mapping[str, Any]
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    spec_file: str = ""
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restarts: int = 0
    exit_code: int | None = None
    next_start: float = 0.0
    ready: bool = False


class PodWorker(threading.Thread):
    """Everything about one pod, from its first sight to its removal."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        super().__init__(name=f"pod {pods.key(pod)}", daemon=True)
        self.k, self.pod = kubelet, pod
        self.uid = str(pod["metadata"]["uid"])
        self.key = pods.key(pod)
        self.namespace, self.name = self.key
        self.host_network = bool(pod.get("spec", {}).get("hostNetwork"))
        self.wake = threading.Event()
        self.gone = False  # removed from the API (force-deleted)
        self.containers: list[Container] = []
        self.ip: str | None = None
        self.started = False
        self.started_at = now()
        self.waiting: tuple[str, str] | None = None  # (reason, message) while it cannot start
        self.token_refresh = float("inf")
        self.reported: dict[str, Any] | None = None
        self.dir = self.k.dir / self.uid

    # -- what the kubelet tells it

    def update(self, pod: dict[str, Any] | None) -> None:
        if pod is None:
            self.gone = True
        else:
            self.pod = pod
        self.wake.set()

    # -- names

    @property
    def netns(self) -> str:
        from veil.lab.lab import node_netns, pod_netns  # noqa: PLC0415

        if self.host_network:
            return node_netns(self.k.lab, self.k.node.name)
        return pod_netns(self.k.lab, self.namespace, self.name)

    @property
    def cgroup(self) -> Path:
        """`pod<uid>`, as the kubelet's cgroupfs driver names it (the agent finds a running
        pod's netns by it: agent/podfinder.py)."""
        return cgroups.lab_group(self.k.lab) / "pods" / f"pod{self.uid}"

    @property
    def container_id(self) -> str:
        return self.uid.replace("-", "")

    # -- the loop

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: worker failed; removing the pod", self.namespace, self.name)
            self.teardown(0)
        finally:
            self.k.forget(self.uid)

    def _run(self) -> None:
        while True:
            deleting = self.pod["metadata"].get("deletionTimestamp")
            if self.gone or deleting:
                grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
                self.teardown(0 if self.gone else int(grace if grace is not None else 30))
                if not self.gone:
                    self.k.finish_deletion(self.namespace, self.name)
                return
            if not self.started:
                try:
                    self.setup()
                    self.started, self.waiting = True, None
                except pods.PodError as e:
                    self.waiting = (e.reason, str(e))
                except (CniError, OSError, subprocess.SubprocessError, ApiError) as e:
                    self.waiting = ("ContainerCreating", str(e))
                if self.waiting:
                    log.warning("pod %s/%s: %s", self.namespace, self.name, self.waiting[1])
                    self.teardown(0, keep_record=False)
            else:
                self.check()
            self.report()
            self.wake.wait(TICK if self.started else 3.0)
            self.wake.clear()

    # -- setting it up

    def _lookup(self, kind: str, name: str) -> Mapping[str, str] | None:
        res = ConfigMap if kind == "ConfigMap" else Secret
        try:
            obj = self.k.client.get(res, name, namespace=self.namespace)
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise
        data = getattr(obj, "data", None)
        if kind == "Secret":
            return pods.decode_secret(data)
        return dict(data or {})

    def _tokens(self) -> dict[tuple[str, str], str]:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        out, shortest = {}, float("inf")
        for t in pods.token_specs(self.pod):
            spec = TokenRequestSpec(
                audiences=[t.audience] if t.audience else [],
                expirationSeconds=t.seconds,
                boundObjectRef=BoundObjectReference(
                    apiVersion="v1", kind="Pod", name=self.name, uid=self.uid
                ),
            )
            request = ServiceAccount.Token(
                metadata=ObjectMeta(name=sa, namespace=self.namespace), spec=spec
            )
            got = self.k.client.create(request, sa, namespace=self.namespace)
            if got.status is None:
                raise pods.PodError("ContainerCreating", f"no token for service account {sa}")
            out[(t.volume, t.path)] = str(got.status.token)
            shortest = min(shortest, t.seconds)
        # Refreshed at 80% of the shortest lifetime, as the kubelet does.
        self.token_refresh = time.monotonic() + 0.8 * shortest
        return out

    def _resolve_volumes(self) -> list[pods.Volume]:
        """Every volume's content (API lookups, tokens): done before the pod's network is
        set up, so a ConfigMap not there yet costs a retry, not a network torn down."""
        ips = (self.ip or "", str(self.k.node.underlay_ip))
        return pods.volumes(self.pod, self._lookup, self._tokens(), ips)

    def _write_volumes(self, volumes: list[pods.Volume]) -> dict[str, str]:
        """Each volume's host path, its files written."""
        out = {}
        for v in volumes:
            if v.host_path is not None:  # the node's own, or the machine's shared views
                p = Path(pods.node_host_path(v.host_path, str(self.k.host_root)))
                if v.host_path_type in ("", "DirectoryOrCreate") and not p.exists():
                    p.mkdir(parents=True, exist_ok=True)
                elif v.host_path_type == "FileOrCreate" and not p.exists():
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.touch()
                elif not p.exists():
                    raise pods.PodError(
                        "ContainerCreating", f"volume {v.name}: hostPath {p} does not exist"
                    )
                out[v.name] = str(p)
                continue
            d = self.dir / "volumes" / v.name
            d.mkdir(parents=True, exist_ok=True)
            for rel, (data, mode) in (v.files or {}).items():
                path = d / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_bytes(data)
                tmp.chmod(mode)
                tmp.replace(path)  # a rename: containers see the new file whole
            out[v.name] = str(d)
        return out

    def _network(self) -> None:
        from veil.lab.lab import cni_runtime, node_network  # noqa: PLC0415

        if self.host_network:
            self.ip = str(self.k.node.underlay_ip)
            return
        self.k.save_record(self)  # before anything exists, so `lab down` finds it all
        if not netns.exists(self.netns):
            netns.add(self.netns)
        runtime = cni_runtime(self.k.lab, self.k.node.name)
        args = cni_args(self.namespace, self.name, self.uid)
        runtime.add(LOOPBACK_CONFIG, Attachment(self.container_id, self.netns, "lo", args))
        result = runtime.add(
            node_network(self.k.lab, self.k.node),
            Attachment(self.container_id, self.netns, "eth0", args),
        )
        self.ip = str(result_ip(result))

    def setup(self) -> None:
        volumes = self._resolve_volumes()
        cgroups.create(self.cgroup)  # before the network: eBPF capture attaches there at ADD
        self.k.save_record(self)
        self._network()
        volume_paths = self._write_volumes(volumes)
        extra: list[pods.Mount] = []
        if pods.cluster_dns(self.pod):  # hostNetwork pods too, with ClusterFirstWithHostNet
            assert self.ip is not None
            hosts, resolv = self.dir / "hosts", self.dir / "resolv.conf"
            hosts.write_text(self.k.hosts_for(self, IPv4Address(self.ip)))
            resolv.write_text(render_resolv_conf(self))
            extra = [
                pods.Mount(str(hosts), "/etc/hosts", False),
                pods.Mount(str(resolv), "/etc/resolv.conf", True),
            ]
        self.containers = []
        for spec in self.pod["spec"].get("containers") or []:
            veil_image = pods.is_veil_image(str(spec.get("image", "")))
            path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            if veil_image:
                path = f"{Path(sys.executable).parent}:{path}"
            env = pods.container_env(
                self.pod, spec, self.ip or "", str(self.k.node.underlay_ip), self._lookup, path
            )
            c = Container(str(spec["name"]), str(spec.get("image", "")), spec)
            c.argv, c.env = pods.argv(spec, env), env
            binds = [*extra, *pods.mounts(spec, volume_paths)]
            for i, m in enumerate(binds):
                if not pods.nested(binds, i):  # a nested one is made in its volume
                    self.k.ensure_target(m)
            c.spec_file = str(self.dir / f"{c.name}.mounts.json")
            Path(c.spec_file).write_text(
                json.dumps(
                    {
                        "cgroup": str(self.cgroup),
                        "mounts": [
                            {"source": m.source, "target": m.target, "readOnly": m.read_only}
                            for m in binds
                        ],
                    }
                )
            )
            self.containers.append(c)
        for c in self.containers:
            self.start_container(c)
        self.k.save_record(self)
        log.info("pod %s/%s started (%s)", self.namespace, self.name, self.ip)

    def start_container(self, c: Container) -> None:
        logs = store.lab_dir(self.k.lab) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        argv = [
            "unshare", "--mount", "--propagation", "slave", "--",
            sys.executable, "-m", "veil.lab.mounts", c.spec_file, "--", *c.argv,
        ]  # fmt: skip
        with open(logs / f"{self.namespace}_{self.name}_{c.name}.log", "ab") as out:
            c.proc = subprocess.Popen(
                netns.nsenter_argv(self.netns, argv),
                env=c.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,  # no preexec_fn: this process has threads
            )
        c.started_at, c.exit_code, c.ready = now(), None, False

    # -- keeping it running

    def check(self) -> None:
        policy = str(self.pod["spec"].get("restartPolicy") or "Always")
        for c in self.containers:
            if c.proc is None:
                if time.monotonic() >= c.next_start:
                    c.restarts += 1
                    self.start_container(c)
                    self.k.save_record(self)
                continue
            code = c.proc.poll()
            if code is None:
                want = pods.ready_ports(c.spec)
                c.ready = not want or want <= netns.listening_ports(c.proc.pid)
                continue
            log.info("pod %s/%s: container %s exited (%d)", self.namespace, self.name, c.name, code)
            c.exit_code, c.ready, c.proc = code, False, None
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                delay = min(RESTART_BACKOFF[0] * 2 ** min(c.restarts, 10), RESTART_BACKOFF[1])
                c.next_start = time.monotonic() + delay
            else:
                c.next_start = float("inf")
        if time.monotonic() >= self.token_refresh:
            try:
                self._write_volumes(self._resolve_volumes())
            except Exception as e:  # the old token stays valid until it expires
                log.warning("pod %s/%s: token refresh failed: %s", self.namespace, self.name, e)
                self.token_refresh = time.monotonic() + 10

    def report(self) -> None:
        states = [
            pods.ContainerState(
                name=c.name,
                image=c.image,
                running=c.proc is not None,
                ready=c.ready,
                restarts=c.restarts,
                started_at=c.started_at,
                exit_code=c.exit_code,
                container_id=self.container_id + c.name,
            )
            for c in self.containers
        ]
        if self.waiting:
            reason, message = self.waiting
            states = [
                pods.ContainerState(
                    str(s["name"]), str(s.get("image", "")), False, False, 0, None,
                    waiting_reason=reason, waiting_message=message,
                )
                for s in self.pod["spec"].get("containers") or []
            ]  # fmt: skip
        status = pods.pod_status(
            self.pod, self.ip, str(self.k.node.underlay_ip), self.started_at, states, self.started
        )
        if status == self.reported:
            return
        try:
            self.k.client.patch(Pod.Status, self.name, {"status": status}, namespace=self.namespace)
            self.reported = status
        except ApiError as e:
            if e.status.code == 404:
                self.gone = True
            else:
                log.warning("pod %s/%s: status not reported: %s", self.namespace, self.name, e)
        except Exception as e:
            log.warning("pod %s/%s: status not reported: %s", self.namespace, self.name, e)

    def rewrite_hosts(self) -> None:
        """/etc/hosts is a bind-mounted file: rewritten in place (a rename would leave the
        containers looking at the old one)."""
        if not self.ip or not (self.dir / "hosts").exists():
            return
        text = self.k.hosts_for(self, IPv4Address(self.ip))
        with open(self.dir / "hosts", "r+", encoding="utf-8") as f:
            if f.read() != text:
                f.seek(0)
                f.write(text)
                f.truncate()

    # -- removing it

    def teardown(self, grace: int, keep_record: bool = False) -> None:
        """SIGTERM, up to `grace` seconds, SIGKILL (the whole cgroup), CNI DEL, netns gone."""
        procs = [c.proc for c in self.containers if c.proc is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.cgroup.exists():
            cgroups.kill_and_remove(self.cgroup)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for c in self.containers:
            c.proc = None
        if not self.host_network:
            remove_network(self.k.lab, self.k.node, self.netns, cni_args(*self.key, self.uid))
        shutil.rmtree(self.dir, ignore_errors=True)
        self.ip, self.started = None, False
        if not keep_record:
            self.k.drop_record(self.uid)
        log.info("pod %s/%s removed", self.namespace, self.name)


def cni_args(namespace: str, name: str, uid: str) -> dict[str, str]:
    """CNI_ARGS as a container runtime gives them, on ADD and DEL alike (veil-cni needs the
    pod's name on DEL too, or the agent would keep capturing a network that is gone)."""
    return {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": namespace,
        "K8S_POD_NAME": name,
        "K8S_POD_INFRA_CONTAINER_ID": uid.replace("-", ""),
        "K8S_POD_UID": uid,
    }


def remove_network(lab: str, node: NodePlan, ns: str, args: dict[str, str]) -> None:
    """CNI DEL (the node network, then loopback) and the netns; each step tolerates what is
    already gone, so it can run again after a failure."""
    from veil.lab.lab import cni_runtime, node_network  # noqa: PLC0415

    if netns.exists(ns):
        runtime = cni_runtime(lab, node.name)
        container_id = args["K8S_POD_INFRA_CONTAINER_ID"]
        for conf, ifname in ((node_network(lab, node), "eth0"), (LOOPBACK_CONFIG, "lo")):
            try:
                runtime.delete(conf, Attachment(container_id, ns, ifname, args))
            except CniError as e:
                log.warning("CNI DEL of %s (%s): %s", ns, ifname, e)
        netns.delete(ns)


# -- the node ---------------------------------------------------------------------------------


class Kubelet:
    def __init__(self, lab: str, node: NodePlan, client: Client, proxy: Client) -> None:
        self.lab, self.node, self.client, self.proxy = lab, node, client, proxy
        self.dir = store.lab_dir(lab) / "kubelet" / node.name
        self.dir.mkdir(parents=True, exist_ok=True)
        # hostPath volumes of this node: lab nodes share one machine (pods.node_host_path)
        self.host_root = controlplane_node_dir(lab, node.name) / "host"
        self.lock = threading.Lock()
        self.workers: dict[str, PodWorker] = {}
        self.services: list[Any] = []  # [(service, ServicePort, [Endpoint])]
        self._nat = ""
        self.stop = threading.Event()

    def startup_taints(self) -> list[Taint]:
        """With Veil's chart, nodes register tainted not-ready for Veil until its agent can
        capture (docs/install.md), as a node pool's kubelets would be configured."""
        if not store.chart_mode(self.lab):
            return []
        return [Taint(key="veil.dev/not-ready", value="true", effect="NoSchedule")]

    # -- the pod registry (what `lab down` and a restarted kubelet read)

    def save_record(self, w: PodWorker) -> None:
        entry = {
            "namespace": w.namespace,
            "name": w.name,
            "uid": w.uid,
            "node": self.node.name,
            "netns": w.netns,
            "hostNetwork": w.host_network,
            "containerID": w.container_id,
            "cgroup": str(w.cgroup),
            "pids": [c.proc.pid for c in w.containers if c.proc is not None],
            "ip": w.ip,
        }
        store.atomic_write(self.dir / f"{w.uid}.json", json.dumps(entry), mode=0o600)

    def drop_record(self, uid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{uid}.json").unlink()

    def ensure_target(self, m: pods.Mount) -> None:
        """Create a bind mount's missing target on the host (an empty directory, or file when
        the source is one), and remember it, so `lab down` removes it."""
        target = Path(m.target)
        if target.exists() or target.is_symlink():
            return
        missing = [target, *(p for p in target.parents if not p.exists())]
        for p in reversed(missing):
            if p == target and not Path(m.source).is_dir():
                p.touch()
            else:
                p.mkdir(exist_ok=True)
        with open(store.lab_dir(self.lab) / "kubelet" / "mountpoints", "a", encoding="utf-8") as f:
            f.writelines(f"{p}\n" for p in missing)

    def clean_previous(self) -> None:
        """Pods a previous run of this kubelet left: removed (they are started afresh)."""
        for f in self.dir.glob("*.json"):
            entry = json.loads(f.read_text())
            group = Path(entry["cgroup"])
            if group.exists():
                cgroups.kill_and_remove(group)
            if not entry.get("hostNetwork"):
                args = cni_args(entry["namespace"], entry["name"], entry["uid"])
                remove_network(self.lab, self.node, entry["netns"], args)
            shutil.rmtree(self.dir / entry["uid"], ignore_errors=True)
            f.unlink()
            log.info("removed %s/%s left by a previous kubelet", entry["namespace"], entry["name"])

    # -- pods

    def on_pods(self, held: dict[str, dict[str, Any]]) -> None:
        with self.lock:
            for uid, pod in held.items():
                if uid in self.workers:
                    self.workers[uid].update(pod)
                else:  # one already being deleted is removed by its worker at once
                    w = PodWorker(self, pod)
                    self.workers[uid] = w
                    w.start()
            for uid, w in self.workers.items():
                if uid not in held:
                    w.update(None)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    def finish_deletion(self, namespace: str, name: str) -> None:
        """The pod's processes and network are gone: the kubelet's final delete (grace 0)."""
        try:
            self.client.delete(Pod, name, namespace=namespace, grace_period=0)
        except ApiError as e:
            if e.status.code != 404:
                log.warning("pod %s/%s: final delete failed: %s", namespace, name, e)

    # -- services (kube-proxy)

    def hosts_for(self, w: PodWorker, ip: IPv4Address) -> str:
        with self.lock:
            seen = {(s.namespace, s.name): s for s, _port, _eps in self.services}
        return render_hosts(w, ip, seen.values())

    def on_services(self, held: dict[str, dict[str, Any]]) -> None:
        self._services = held
        self._sync_proxy()

    def on_slices(self, held: dict[str, dict[str, Any]]) -> None:
        self._slices = held
        self._sync_proxy()

    _services: dict[str, dict[str, Any]] | None = None
    _slices: dict[str, dict[str, Any]] | None = None

    def _sync_proxy(self) -> None:
        if self._services is None or self._slices is None:
            return
        table = service_table(self._services.values(), self._slices.values())
        rules = render_service_nat(table)
        from veil.lab.lab import node_netns  # noqa: PLC0415

        if rules != self._nat:
            netns.iptables_restore(node_netns(self.lab, self.node.name), rules)
            self._nat = rules
        with self.lock:
            changed = [(s.namespace, s.name, s.cluster_ip) for s, _, _ in table] != [
                (s.namespace, s.name, s.cluster_ip) for s, _, _ in self.services
            ]
            self.services = table
            workers = list(self.workers.values())
        if changed:
            for w in workers:
                with contextlib.suppress(OSError):
                    w.rewrite_hosts()

    # -- the process

    def run(self) -> None:
        self.clean_previous()
        mine = {"spec.nodeName": self.node.name}
        threads = [
            threading.Thread(
                target=heartbeat, args=(self.client, self.node, self.stop, self.startup_taints())
            ),
            threading.Thread(target=follow, args=(self.client, Pod, self.on_pods, self.stop, mine)),
            threading.Thread(
                target=follow, args=(self.proxy, Service, self.on_services, self.stop)
            ),
            threading.Thread(
                target=follow, args=(self.proxy, EndpointSlice, self.on_slices, self.stop)
            ),
        ]
        for t in threads:
            t.daemon = True
            t.start()
        self.stop.wait()


@dataclass(frozen=True)
class ApiService:
    namespace: str
    name: str
    cluster_ip: IPv4Address


def service_table(
    services: Any, slices: Any
) -> list[tuple[ApiService, ServicePort, list[Endpoint]]]:
    """What kube-proxy programs: each ClusterIP service port with its ready endpoints, from
    the API's Services and EndpointSlices (pure)."""
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sl in slices:
        md = sl["metadata"]
        owner = (md.get("labels") or {}).get("kubernetes.io/service-name")
        if owner:
            by_service.setdefault((md["namespace"], owner), []).append(sl)
    out = []
    for svc in services:
        md, spec = svc["metadata"], svc.get("spec", {})
        ip = spec.get("clusterIP")
        if not ip or ip == "None" or spec.get("type") == "ExternalName":
            continue
        api = ApiService(md["namespace"], md["name"], IPv4Address(ip))
        for p in spec.get("ports") or []:
            if p.get("protocol", "TCP") != "TCP":
                continue
            port = ServicePort(int(p["port"]), p.get("targetPort", p["port"]), p.get("name"))
            eps = []
            for sl in by_service.get((api.namespace, api.name), []):
                number = next(
                    (
                        int(sp["port"])
                        for sp in sl.get("ports") or []
                        if (sp.get("name") or None) == (p.get("name") or None) and sp.get("port")
                    ),
                    None,
                )
                if number is None:
                    continue
                for ep in sl.get("endpoints") or []:
                    if (ep.get("conditions") or {}).get("ready") is False:
                        continue
                    ref = ep.get("targetRef") or {}
                    for addr in ep.get("addresses") or []:
                        eps.append(
                            Endpoint(
                                ip=IPv4Address(addr),
                                port=number,
                                pod=str(ref.get("name") or addr),
                                node=str(ep.get("nodeName") or ""),
                            )
                        )
            out.append((api, port, sorted(eps, key=lambda e: (e.pod, str(e.ip)))))
    return out


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if len(sys.argv) != 5:
        sys.exit("usage: python -m veil.lab.kubelet LAB NODE INDEX MASK")
    from veil.lab.controlplane import kube_dir  # noqa: PLC0415

    lab, name, index, mask = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    node = NodePlan(name, index, mask)
    d = kube_dir(lab)

    def client(user: str) -> Client:
        return Client(
            config=KubeConfig.from_file(str(d / f"{user}.kubeconfig")),
            field_manager="veil-lab-kubelet",
        )

    kubelet = Kubelet(lab, node, client(f"kubelet-{name}"), client("kube-proxy"))
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stop.set())
    kubelet.run()


if __name__ == "__main__":
    main()
