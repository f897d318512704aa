"""`veil lab`: a real multi-node cluster in network namespaces on one machine.

Theory of operation
-------------------
`up` validates every manifest and computes the whole plan first (veil.lab.plan), so a bad
manifest creates nothing. It then writes the lab's record (lab.yaml, naming every netns and
cgroup it is about to create) before creating anything, so `down` can remove a lab that `up`
left half-built, even after a kill -9. Topology:

    underlay netns  --- br0 ---+--- eth0 [node1 netns] --ptp veth-- [pod netns] ...
    (172.30.0.0/24)            +--- eth0 [node2 netns] --ptp veth-- [pod netns] ...

Nodes route each other's pod CIDR (10.244.<n>.0/24) over the underlay and hold the
kube-proxy-like DNAT rules for service VIPs (10.96.0.0/16). Pods get their network from the
real CNI plugins run in the node netns. Each pod's processes run in its netns (with a per-pod
/etc/hosts) and in a per-pod cgroup v2 group, detached from `up`, which exits once every pod
is ready. Nothing is linked to the machine's root network namespace.

`down` kills the lab's cgroup tree and anything left in its namespaces, runs CNI DEL, then
deletes namespaces, hosts files, cgroups and the state directory. It is idempotent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, NoReturn

import yaml

from veil.agent.cni import shim_path
from veil.core.state import GATEWAY_NAME_LABEL
from veil.lab import cgroups, controlplane, netns, procfs, store, supervise, upstream
from veil.lab.cni import (
    DEFAULT_CNI_PATH,
    LOOPBACK_CONFIG,
    Attachment,
    CniError,
    CniRuntime,
    network_config,
)
from veil.lab.cni import result_ip as cni_result_ip
from veil.lab.errors import LabError
from veil.lab.manifests import Object, load_paths
from veil.lab.plan import (
    NODE_MASK,
    SERVICE_CIDR,
    UNDERLAY_CIDR,
    LabPlan,
    NodePlan,
    PodPlan,
    check_lab_name,
    endpoints,
    make_plan,
    recorded_mask,
    render_hosts,
    render_resolv_conf,
    render_service_nat,
    stable_uid,
    waypoint_pods,
)
from veil.runtime.config import MAX_WORKERS

ETC_NETNS = Path("/etc/netns")
READY_TIMEOUT = 30.0
K8S_TIMEOUT = 90.0  # etcd, the API server and node registration, on a busy 2-core machine
ANNOTATION_NETNS = "lab.veil.dev/netns"
ANNOTATION_CGROUP = "lab.veil.dev/cgroup"
CAPTURE_MODES = ("iptables", "ebpf")

Log = Callable[[str], None]


# -- names ------------------------------------------------------------------------------------


def underlay_netns(lab: str) -> str:
    return f"veil-{lab}-underlay"


def node_netns(lab: str, node: str) -> str:
    return f"veil-{lab}-{node}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    # '_' appears in neither namespace nor pod names, so this is unambiguous and never
    # collides with a node's netns.
    return f"veil-{lab}-{namespace}_{pod}"


def netns_prefix(lab: str) -> str:
    return f"veil-{lab}-"  # lab names have no '-', so one lab's prefix never matches another's


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- preflight --------------------------------------------------------------------------------


def preflight() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "the lab needs root (it creates network namespaces, iptables rules "
            "and cgroups): run it with sudo"
        )
    for tool in ("ip", "iptables-restore", "nsenter", "sysctl"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: run `make setup` (as root) to install it")
    runtime = CniRuntime("unused")
    for plugin in ("ptp", "host-local", "loopback"):
        try:
            runtime.find(plugin)
        except CniError as e:
            raise LabError(str(e)) from None
    try:
        cgroups.root()
    except cgroups.CgroupError as e:
        raise LabError(str(e)) from None


def leftovers(lab: str) -> list[str]:
    """Namespaces, hosts dirs and state a lab of this name still has on the machine."""
    prefix = netns_prefix(lab)
    found = [f"netns {n}" for n in netns.listing() if n.startswith(prefix)]
    if ETC_NETNS.exists():
        found += [f"{p}" for p in ETC_NETNS.iterdir() if p.name.startswith(prefix)]
    if store.lab_dir(lab).exists():
        found.append(str(store.lab_dir(lab)))
    if controlplane.bpf_lab_dir(lab).exists():
        found.append(str(controlplane.bpf_lab_dir(lab)))
    try:
        if cgroups.lab_group(lab).exists():
            found.append(str(cgroups.lab_group(lab)))
    except cgroups.CgroupError:
        pass
    return found


# -- up ---------------------------------------------------------------------------------------


@dataclass
class RunningPod:
    plan: PodPlan
    ip: IPv4Address
    procs: list[subprocess.Popen[bytes]]
    ports: set[int]


def up(
    paths: Sequence[str | Path],
    lab: str = "lab",
    nodes: int = 2,
    *,
    log: Log = print,
    ready_timeout: float = READY_TIMEOUT,
    cert_ttl: int | None = None,
    capture: Sequence[str] = (),
    kubernetes: bool = False,
    chart: bool = False,
    node_mask: int = NODE_MASK,
    agent_workers: int = 1,
) -> LabPlan:
    """Bring a lab up from manifests. With `kubernetes`, the upstream control plane runs in
    the control-plane netns too, and each node registers with it (lab/kubernetes.py).
    `node_mask`: the prefix length of each node's pod range (a /24 holds 245 pods).
    `agent_workers`: each agent's worker processes (1, the default: the lab's nodes share
    this machine's cores, so one worker per core on every node would overcommit them)."""
    check_lab_name(lab)
    if not 1 <= agent_workers <= MAX_WORKERS:
        raise LabError(f"--agent-workers {agent_workers}: use 1 to {MAX_WORKERS}")
    # all validation happens before any change
    plan = make_plan(load_paths(paths), lab, nodes, node_mask)
    modes = capture_modes(capture, [n.name for n in plan.nodes])
    preflight()
    if kubernetes and (missing := upstream.missing()):
        raise LabError(
            f"--kubernetes needs the upstream binaries ({', '.join(missing)} missing in "
            f"{upstream.bin_dir()}): run `make upstream`"
        )
    if "ebpf" in modes.values():
        from veil.agent.capture import ebpf  # noqa: PLC0415
        from veil.agent.capture.base import CaptureError  # noqa: PLC0415

        try:
            ebpf.preflight()
        except CaptureError as e:
            raise LabError(str(e)) from None
    if found := leftovers(lab):
        raise LabError(
            f"lab {lab!r} already exists or was left over ({', '.join(found[:3])}"
            f"{' ...' if len(found) > 3 else ''}): run `veil lab down --name {lab}`"
        )
    cg = cgroups.lab_group(lab)
    record: dict[str, Any] = {
        "name": lab,
        "status": "creating",
        "created": now(),
        "upPid": os.getpid(),
        "manifests": [str(Path(p).resolve()) for p in paths],
        "cgroup": str(cg),
        "kubernetes": kubernetes,
        "chart": chart,
        "underlay": {"netns": underlay_netns(lab), "cidr": str(UNDERLAY_CIDR)},
        "nodes": [
            {
                "name": n.name,
                "netns": node_netns(lab, n.name),
                "underlayIP": str(n.underlay_ip),
                "podCIDR": str(n.pod_cidr),
                "capture": modes[n.name],
                "workers": agent_workers,
            }
            for n in plan.nodes
        ],
        "pods": [
            pod_entry(lab, cg, p)
            for p in plan.pods
            if not kubernetes  # there, each node's kubelet keeps its own registry
        ],
    }
    store.lab_dir(lab).mkdir(parents=True, exist_ok=True)
    store.write_record(lab, record)
    try:
        cgroups.create(cg)
        build_topology(plan, log)
        controlplane.build_cp_netns(
            lab, underlay_netns(lab), [(str(n.pod_cidr), str(n.underlay_ip)) for n in plan.nodes]
        )
        # Control plane and node agents first, as on a real cluster: the CA, then one agent
        # per node (DaemonSet pods are up before the workloads they serve).
        controlplane.write_node_credentials(plan)
        if kubernetes:
            bring_up_kubernetes(
                plan, record, modes, ready_timeout, cert_ttl=cert_ttl, log=log, chart=chart
            )
        else:
            bring_up_manifests(plan, record, modes, ready_timeout, cert_ttl=cert_ttl, log=log)
        log(
            f"lab {lab!r}: CA on {controlplane.CA_IP}:{controlplane.CA_PORT}, an agent on "
            f"every node holding certificates for its workloads' identities"
        )
        record["status"] = "up"
        store.write_record(lab, record)
    except BaseException:
        log(f"lab {lab!r}: bring-up failed, removing what was created")
        down(lab, log=lambda _m: None)
        raise
    return plan


def bring_up_manifests(
    plan: LabPlan,
    record: dict[str, Any],
    modes: Mapping[str, str],
    ready_timeout: float,
    *,
    cert_ttl: int | None,
    log: Log,
) -> None:
    """Manifest mode: the lab writes the state the CA and agents read, and runs the pods."""
    lab, cg = plan.name, Path(record["cgroup"])
    write_static_objects(plan)
    ca = controlplane.start_ca(plan, spawn, cert_ttl=cert_ttl)
    record["processes"] = [{**ca.record(), "cgroup": str(cg / "control-plane" / "ca")}]
    store.write_record(lab, record)
    controlplane.wait_listening([ca], ready_timeout)
    controlplane.distribute_trust_bundle(plan)
    agents = controlplane.start_agents(
        plan, spawn, node_netns, modes, workers=controlplane.recorded_workers(record)
    )
    record["processes"] += [
        {**a.record(), "cgroup": str(cg / "nodes" / a.name.split()[1] / "agent")} for a in agents
    ]
    store.write_record(lab, record)
    controlplane.wait_listening(agents, ready_timeout)
    running = [start_pod(plan, p, record, log) for p in plan.pods]
    store.write_record(lab, record)
    wait_ready(plan, running, ready_timeout, log)
    sync_services(plan, running)
    controlplane.wait_agents_ready(agents, ready_timeout)


def bring_up_kubernetes(
    plan: LabPlan,
    record: dict[str, Any],
    modes: Mapping[str, str],
    ready_timeout: float,
    *,
    cert_ttl: int | None,
    log: Log,
    chart: bool = False,
) -> None:
    """Kubernetes mode: the upstream control plane, a kubelet per node, the CA and agents
    reading the API; then the manifests are applied with kubectl and the kubelets run their
    pods."""
    from veil.lab import kubernetes as k8s  # noqa: PLC0415

    lab, cg = plan.name, Path(record["cgroup"])
    record["processes"] = []
    cp = k8s.start(plan, spawn, K8S_TIMEOUT)
    record["processes"] += [
        {**d.record(), "cgroup": str(cg / "control-plane" / d.name)} for d in cp
    ]
    store.write_record(lab, record)
    k8s.install(lab, K8S_TIMEOUT, rbac=not chart)
    kubelets = k8s.start_kubelets(plan, spawn, node_netns)
    record["processes"] += [
        {**d.record(), "cgroup": str(cg / "nodes" / d.name.split()[1] / "kubelet")}
        for d in kubelets
    ]
    store.write_record(lab, record)
    k8s.wait_nodes_ready(plan, K8S_TIMEOUT)
    log(f"lab {lab!r}: Kubernetes API on {k8s.server_url()}, nodes registered")
    if chart:  # Veil as users install it: the kubelets run its DaemonSet and Deployments
        for n in plan.nodes:
            install_primary_cni(lab, n)
        k8s.helm_install(lab, modes, K8S_TIMEOUT, controlplane.recorded_workers(record))
        k8s.wait_workloads(lab, max(ready_timeout, K8S_TIMEOUT))
        log(f"lab {lab!r}: Veil installed with its Helm chart (deploy/chart/veil)")
        k8s.apply_manifests(lab, record["manifests"])
        k8s.wait_workloads(lab, max(ready_timeout, K8S_TIMEOUT))
        return
    ca = controlplane.start_ca(
        plan, spawn, cert_ttl=cert_ttl, kubeconfig=controlplane.ca_kubeconfig(lab)
    )
    record["processes"].append({**ca.record(), "cgroup": str(cg / "control-plane" / "ca")})
    store.write_record(lab, record)
    controlplane.wait_listening([ca], ready_timeout)
    controlplane.distribute_trust_bundle(plan)
    controller = k8s.start_controller(plan, spawn)
    record["processes"].append(
        {**controller.record(), "cgroup": str(cg / "control-plane" / "controller")}
    )
    store.write_record(lab, record)
    agents = controlplane.start_agents(
        plan,
        spawn,
        node_netns,
        modes,
        kubeconfigs={n.name: controlplane.agent_kubeconfig(lab, n.name) for n in plan.nodes},
        workers=controlplane.recorded_workers(record),
    )
    record["processes"] += [
        {**a.record(), "cgroup": str(cg / "nodes" / a.name.split()[1] / "agent")} for a in agents
    ]
    store.write_record(lab, record)
    controlplane.wait_listening(agents, ready_timeout)
    k8s.apply_manifests(lab, record["manifests"])
    k8s.wait_workloads(lab, max(ready_timeout, K8S_TIMEOUT))
    controlplane.wait_agents_ready(agents, ready_timeout)


def capture_modes(spec: Sequence[str], nodes: Sequence[str]) -> dict[str, str]:
    """`--capture ebpf` (every node) and/or `--capture node2=ebpf` (one node); default iptables."""
    modes = dict.fromkeys(nodes, "iptables")
    for item in spec:
        node, sep, mode = item.rpartition("=")
        if mode not in CAPTURE_MODES:
            raise LabError(f"--capture {item!r}: the mode must be iptables or ebpf")
        if not sep:
            modes = dict.fromkeys(nodes, mode)
        elif node in modes:
            modes[node] = mode
        else:
            raise LabError(f"--capture {item!r}: no node {node!r} (nodes: {', '.join(nodes)})")
    return modes


def build_topology(plan: LabPlan, log: Log) -> None:
    lab = plan.name
    u = underlay_netns(lab)
    netns.add(u)
    netns.ip(u, "link", "add", "br0", "type", "bridge")
    netns.ip(u, "link", "set", "br0", "up")
    for n in plan.nodes:
        ns = node_netns(lab, n.name)
        netns.add(ns)
        # Created from inside the underlay: one end there, the peer straight into the node.
        netns.ip(u, "link", "add", n.name, "type", "veth", "peer", "name", "eth0", "netns", ns)
        netns.ip(u, "link", "set", n.name, "master", "br0", "up")
        netns.ip(ns, "addr", "add", f"{n.underlay_ip}/{UNDERLAY_CIDR.prefixlen}", "dev", "eth0")
        netns.ip(ns, "link", "set", "eth0", "up")
        netns.sysctl(ns, "net.ipv4.ip_forward", "1")
        for other in plan.nodes:
            if other.name != n.name:
                netns.ip(ns, "route", "add", str(other.pod_cidr), "via", str(other.underlay_ip))
        # Service VIPs from the node itself (hostNetwork pods): a route for the lookup, then
        # the node's NAT (OUTPUT) sends them to an endpoint, as kube-proxy's nodes do.
        netns.ip(ns, "route", "add", str(SERVICE_CIDR), "dev", "eth0")
        cgroups.create(cgroups.lab_group(lab) / "nodes" / n.name)
    log(
        f"lab {lab!r}: underlay {UNDERLAY_CIDR}, nodes "
        + ", ".join(f"{n.name} ({n.underlay_ip}, pods {n.pod_cidr})" for n in plan.nodes)
    )


PRIMARY_CNI_FILE = "10-veil-lab.conflist"


def primary_network(
    lab: str, node: NodePlan, chained: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The node's own pod network: ptp + host-local (the lab's "primary CNI"), then `chained`."""
    cidr = node.pod_cidr
    return network_config(
        name=f"veil-{lab}-{node.name}",
        subnet=str(cidr),
        gateway=str(node.gateway),
        range_start=str(cidr.network_address + 10),
        data_dir=str(store.lab_dir(lab) / "ipam" / node.name),
        extra_plugins=chained,
    )


def node_host(lab: str, node: str) -> Path:
    """The node's own host filesystem (hostPath volumes; lab nodes share one machine)."""
    return controlplane.node_dir(lab, node) / "host"


def install_primary_cni(lab: str, node: NodePlan) -> None:
    """With the chart, the node's CNI config dir holds only the primary network, as on a
    fresh cluster node: the agent's installer chains veil-cni into it."""
    d = node_host(lab, node.name) / "etc/cni/net.d"
    d.mkdir(parents=True, exist_ok=True)
    store.atomic_write(d / PRIMARY_CNI_FILE, json.dumps(primary_network(lab, node), indent=2))


def node_network(lab: str, node: NodePlan) -> dict[str, Any]:
    """The CNI network configuration list of a lab node: ptp + host-local, then veil-cni
    (pointed at the lab agent's socket). With the chart, what a runtime would use: the first
    config file of the node's /etc/cni/net.d, where the agent's installer chains veil-cni;
    its host paths (agentSocket) are the node's, under the node's host root."""
    if not store.chart_mode(lab):
        veil_cni = {"type": "veil-cni", "agentSocket": str(controlplane.cni_socket(lab, node.name))}
        return primary_network(lab, node, [veil_cni])
    from veil.agent.cni.install import as_list, primary  # noqa: PLC0415

    host = node_host(lab, node.name)
    d = host / "etc/cni/net.d"
    name = primary([p.name for p in d.iterdir()]) if d.is_dir() else None
    if name is None:
        raise CniError(f"no network configuration in {d} (the node's primary CNI)")
    try:
        doc = as_list(json.loads((d / name).read_text()))
    except (OSError, ValueError) as e:
        raise CniError(f"network configuration {d / name}: {e}") from None

    def on_host(p: Any) -> Any:
        sock = p.get("agentSocket") if isinstance(p, dict) else None
        if isinstance(sock, str) and sock.startswith("/"):
            return {**p, "agentSocket": str(host / sock.lstrip("/"))}
        return p

    return {**doc, "plugins": [on_host(p) for p in doc["plugins"]]}


def cni_runtime(lab: str, node: str) -> CniRuntime:
    """Plugins from containernetworking-plugins, and veil-cni (the C shim `make setup` built);
    with the chart, the node's own /opt/cni/bin first (where the agent installs veil-cni)."""
    if store.chart_mode(lab):
        path = (str(node_host(lab, node) / "opt/cni/bin"), *DEFAULT_CNI_PATH)
    else:
        path = (*DEFAULT_CNI_PATH, str(shim_path().parent))
    return CniRuntime(
        node_netns(lab, node),
        cni_path=path,
        cache_dir=store.lab_dir(lab) / "cni",
    )


def cni_add_with_retry(
    runtime: CniRuntime, conf: dict[str, Any], att: Attachment, timeout: float
) -> dict[str, Any]:
    """ADD, retried as kubelet retries pod sandboxes: DEL after each failure, then again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return runtime.add(conf, att)
        except CniError as e:
            with contextlib.suppress(CniError):
                runtime.delete(conf, att)
            if time.monotonic() > deadline:
                raise LabError(f"pod network for {att.netns} could not be set up: {e}") from None
            time.sleep(0.5)


def attachment(lab: str, pod: PodPlan) -> Attachment:
    return Attachment(
        container_id=pod.uid.replace("-", ""),
        netns=pod_netns(lab, pod.namespace, pod.name),
        args={
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": pod.namespace,
            "K8S_POD_NAME": pod.name,
            "K8S_POD_INFRA_CONTAINER_ID": pod.uid.replace("-", ""),
        },
    )


def pod_entry(lab: str, cg: Path, p: PodPlan) -> dict[str, Any]:
    """A pod the lab runs, as its record keeps it (what `down` needs to remove it)."""
    return {
        "namespace": p.namespace,
        "name": p.name,
        "node": p.node,
        "netns": pod_netns(lab, p.namespace, p.name),
        "cgroup": str(cg / "pods" / f"{p.namespace}_{p.name}"),
        "containerID": p.uid.replace("-", ""),
        "pids": [],
    }


def start_pod(
    plan: LabPlan,
    pod: PodPlan,
    record: dict[str, Any],
    log: Log,
    cni_timeout: float = READY_TIMEOUT,
) -> RunningPod:
    lab = plan.name
    ns = pod_netns(lab, pod.namespace, pod.name)
    node = plan.node(pod.node)
    netns.add(ns)
    # The pod's cgroup exists before its network: eBPF capture attaches there at CNI ADD.
    group = cgroups.create(cgroups.lab_group(lab) / "pods" / f"{pod.namespace}_{pod.name}")
    write_pod(plan, pod, None, phase="Pending", ready=False)  # the pod exists before its network
    runtime = cni_runtime(lab, node.name)
    att = attachment(lab, pod)
    runtime.add(LOOPBACK_CONFIG, Attachment(att.container_id, ns, "lo", att.args))
    result = cni_add_with_retry(runtime, node_network(lab, node), att, cni_timeout)
    ip = cni_result_ip(result)
    hosts = ETC_NETNS / ns / "hosts"
    store.atomic_write(hosts, render_hosts(pod, ip, plan.services))
    store.atomic_write(hosts.with_name("resolv.conf"), render_resolv_conf(pod))
    logs = store.lab_dir(lab) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = pod_env(pod, ip, node)
    waypoint = bool(pod.labels.get(GATEWAY_NAME_LABEL))
    if waypoint:
        env |= controlplane.waypoint_env(lab, pod.namespace, pod.name, node.name)
    procs, states = [], []
    for c in pod.spec.containers:
        argv = list(c.command)
        if waypoint:  # a mesh daemon: restarted whenever it ends, as the kubelet would
            argv, state = controlplane.supervised(lab, f"{pod.namespace}_{pod.name}_{c.name}", argv)
            states.append(str(state))
        log_file = logs / f"{pod.namespace}_{pod.name}_{c.name}.log"
        procs.append(spawn(ns, argv, {**env, **dict(c.env)}, group, log_file))
    entry = next(
        e for e in record["pods"] if e["namespace"] == pod.namespace and e["name"] == pod.name
    )
    entry["pids"] = [p.pid for p in procs]
    if states:
        entry["states"] = states
    entry["ip"] = str(ip)
    write_pod(plan, pod, ip, phase="Pending", ready=False)
    ports = {p.container_port for c in pod.spec.containers for p in c.ports}
    return RunningPod(plan=pod, ip=ip, procs=procs, ports=ports)


def spawn(
    ns: str, argv: Sequence[str], env: Mapping[str, str], group: Path, logfile: Path
) -> subprocess.Popen[bytes]:
    """Start a process detached from `lab up`, in a netns and a cgroup."""
    procs_file = str(group / "cgroup.procs")

    def join_cgroup() -> None:
        # Runs in the child between fork and exec, before the command can do anything.
        fd = os.open(procs_file, os.O_WRONLY)
        os.write(fd, b"0\n")  # "0" means the writing process itself
        os.close(fd)

    # Pods get their /etc/hosts (ip netns exec); node daemons see the host's mounts, like a
    # hostNetwork DaemonSet with /sys/fs/cgroup and /sys/fs/bpf mounted (eBPF capture needs them).
    enter = netns.exec_argv if (ETC_NETNS / ns).exists() else netns.nsenter_argv
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        return subprocess.Popen(
            enter(ns, argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
            preexec_fn=join_cgroup,  # noqa: PLW1509 - `up` starts no threads
        )


def pod_env(pod: PodPlan, ip: IPv4Address, node: NodePlan) -> dict[str, str]:
    """What the downward API would give the container, plus a PATH that finds `veil`."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return {
        "PATH": f"{bindir}:{path}",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_IP": str(ip),
        "NODE_NAME": node.name,
        "HOSTNAME": pod.name,
        "POD_SERVICE_ACCOUNT": pod.spec.service_account,
    }


def wait_ready(plan: LabPlan, running: Sequence[RunningPod], timeout: float, log: Log) -> None:
    """A pod is ready when its processes run and every declared containerPort listens."""
    pending = list(running)
    deadline = time.monotonic() + timeout
    while pending:
        for rp in list(pending):
            for proc in rp.procs:
                if proc.poll() is not None:
                    raise LabError(
                        f"pod {rp.plan.namespace}/{rp.plan.name} exited with code "
                        f"{proc.returncode} before it was ready; its log:\n"
                        + log_tail(plan.name, rp.plan)
                    )
            if rp.ports <= netns.listening_ports(rp.procs[0].pid):
                write_pod(plan, rp.plan, rp.ip, phase="Running", ready=True)
                pending.remove(rp)
        if pending and time.monotonic() > deadline:
            names = ", ".join(
                f"{rp.plan.namespace}/{rp.plan.name} (waiting for ports "
                f"{sorted(rp.ports - netns.listening_ports(rp.procs[0].pid))})"
                for rp in pending
            )
            raise LabError(f"pods not ready after {timeout:.0f}s: {names}")
        time.sleep(0.05)
    log(f"lab {plan.name!r}: {len(running)} pods running")


def log_tail(lab: str, pod: PodPlan, lines: int = 15) -> str:
    out = []
    for c in pod.spec.containers:
        f = store.lab_dir(lab) / "logs" / f"{pod.namespace}_{pod.name}_{c.name}.log"
        if f.exists():
            out += f.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in out) or "    (empty)"


# -- the API-server side: objects with status ----------------------------------------------


def _meta(obj: Object, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    md = dict(obj.raw.get("metadata") or {})
    md.setdefault("uid", _uid(obj.kind, obj.meta.namespace or "", obj.meta.name))
    md.setdefault("creationTimestamp", now())
    if obj.meta.namespace:
        md["namespace"] = obj.meta.namespace
    md.update(extra or {})
    return md


_uid = stable_uid


def write_static_objects(plan: LabPlan) -> None:
    state = store.state_dir(plan.name)
    for n in plan.nodes:
        store.write_object(
            state,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": n.name,
                    "uid": _uid("Node", n.name),
                    "labels": {"kubernetes.io/hostname": n.name},
                    "annotations": {ANNOTATION_NETNS: node_netns(plan.name, n.name)},
                },
                "spec": {"podCIDR": str(n.pod_cidr), "podCIDRs": [str(n.pod_cidr)]},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": str(n.underlay_ip)},
                        {"type": "Hostname", "address": n.name},
                    ],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
        )
    for obj in [*plan.namespaces, *plan.service_accounts, *plan.deployments, *plan.others]:
        doc = {**obj.raw, "metadata": _meta(obj)}
        if obj.kind == "Namespace":
            doc["status"] = {"phase": "Active"}
        store.write_object(state, doc)
    for svc in plan.services:
        spec = {
            **(svc.source.raw.get("spec") or {}),
            "type": "ClusterIP",
            "clusterIP": str(svc.cluster_ip),
            "clusterIPs": [str(svc.cluster_ip)],
        }
        store.write_object(
            state,
            {
                **svc.source.raw,
                "metadata": _meta(svc.source),
                "spec": spec,
                "status": {"loadBalancer": {}},
            },
        )


def write_pod(plan: LabPlan, pod: PodPlan, ip: IPv4Address | None, phase: str, ready: bool) -> None:
    lab = plan.name
    md: dict[str, Any] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod.uid,
        "labels": dict(pod.labels),
        "annotations": {
            **pod.annotations,
            ANNOTATION_NETNS: pod_netns(lab, pod.namespace, pod.name),
            ANNOTATION_CGROUP: str(cgroups.lab_group(lab) / "pods" / f"{pod.namespace}_{pod.name}"),
        },
    }
    if pod.owner:
        md["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": pod.owner,
                "uid": _uid("Deployment", pod.namespace, pod.owner),
            }
        ]
    if pod.source.kind == "Gateway":  # a waypoint pod: its spec is the lab's, not the user's
        source_spec: dict[str, Any] = {
            "containers": [
                {
                    "name": c.name,
                    "command": list(c.command),
                    "ports": [{"name": p.name, "containerPort": p.container_port} for p in c.ports],
                }
                for c in pod.spec.containers
            ]
        }
    else:
        source_spec = (
            pod.source.raw["spec"]["template"]["spec"] if pod.owner else pod.source.raw["spec"]
        )
    node = plan.node(pod.node)
    condition = "True" if ready else "False"
    store.write_object(
        store.state_dir(lab),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": md,
            "spec": {
                **source_spec,
                "nodeName": pod.node,
                "serviceAccountName": pod.spec.service_account,
            },
            "status": {
                "phase": phase,
                **({"podIP": str(ip), "podIPs": [{"ip": str(ip)}]} if ip else {}),
                "hostIP": str(node.underlay_ip),
                "startTime": now(),
                "conditions": [
                    {"type": "Ready", "status": condition},
                    {"type": "ContainersReady", "status": condition},
                ],
            },
        },
    )


def sync_services(plan: LabPlan, running: Sequence[RunningPod]) -> None:
    """Endpoints from ready pods → EndpointSlices in the state, NAT rules in every node."""
    ips = {(rp.plan.namespace, rp.plan.name): rp.ip for rp in running}
    ready = list(ips)
    table = []
    state = store.state_dir(plan.name)
    for svc in plan.services:
        slice_ports = []
        addresses: dict[str, dict[str, Any]] = {}
        for port in svc.ports:
            eps = endpoints(svc, port, plan.pods, ips, ready)
            table.append((svc, port, eps))
            if eps:
                slice_ports.append(
                    {"name": port.name or "", "port": eps[0].port, "protocol": "TCP"}
                )
            for ep in eps:
                addresses[ep.pod] = {
                    "addresses": [str(ep.ip)],
                    "conditions": {"ready": True},
                    "nodeName": ep.node,
                    "targetRef": {"kind": "Pod", "namespace": svc.namespace, "name": ep.pod},
                }
        store.write_object(
            state,
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{svc.name}",
                    "namespace": svc.namespace,
                    "labels": {"kubernetes.io/service-name": svc.name},
                },
                "addressType": "IPv4",
                "ports": slice_ports,
                "endpoints": [addresses[k] for k in sorted(addresses)],
            },
        )
    rules = render_service_nat(table)
    for n in plan.nodes:
        netns.iptables_restore(node_netns(plan.name, n.name), rules)


# -- down -------------------------------------------------------------------------------------


def down(lab: str, log: Log = print) -> list[str]:
    """Remove everything a lab created; safe to run on a half-built or already removed lab."""
    check_lab_name(lab)
    record = store.read_record(lab) or {}
    prefix = netns_prefix(lab)
    removed: list[str] = []
    present = [n for n in netns.listing() if n.startswith(prefix)]
    # 1. processes: anything in the lab's namespaces, then the whole cgroup tree.
    for ns in present:
        for pid in netns.pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    group = Path(record["cgroup"]) if "cgroup" in record else cgroups.lab_group(lab)
    if group.exists():
        cgroups.kill_and_remove(group)
        removed.append(f"cgroup {group}")
    with contextlib.suppress(OSError):
        group.parent.rmdir()  # <cgroup2>/veil, once no lab is left in it
    # 2. CNI DEL while both ends still exist (releases addresses, removes host veths): the
    # pods the lab started, and those the kubelets of kubernetes mode ran.
    for entry in [*record.get("pods", []), *kubelet_pods(lab)]:
        cni_delete(lab, entry, present, log)
    # 3. namespaces: pods first, then nodes, then the underlay.
    order = sorted(
        present, key=lambda n: (0 if "_" in n else 2 if n == underlay_netns(lab) else 1, n)
    )
    for ns in order:
        netns.delete(ns)
        removed.append(f"netns {ns}")
    if ETC_NETNS.exists():
        for d in ETC_NETNS.iterdir():
            if d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
    removed += remove_mountpoints(lab)
    if store.lab_dir(lab).exists():
        shutil.rmtree(store.lab_dir(lab))
        removed.append(str(store.lab_dir(lab)))
    pins = controlplane.bpf_lab_dir(lab)
    if pins.exists():  # maps the killed agents pinned (bpffs: unlink files, then rmdir)
        shutil.rmtree(pins, ignore_errors=True)
        removed.append(str(pins))
        for parent in (pins.parent, pins.parent.parent):  # .../veil/lab, then .../veil
            with contextlib.suppress(OSError):
                parent.rmdir()
    if removed:
        log(
            f"lab {lab!r} removed ({len([r for r in removed if r.startswith('netns')])} "
            "network namespaces)"
        )
    else:
        log(f"lab {lab!r} is not up; nothing to remove")
    return removed


def cni_delete(lab: str, entry: Mapping[str, Any], present: Sequence[str], log: Log) -> None:
    """CNI DEL of one pod (a record entry) while both its netns and its node's exist."""
    pod_ns, node_ns = entry["netns"], node_netns(lab, entry["node"])
    if pod_ns not in present or node_ns not in present:
        return
    cache = store.lab_dir(lab) / "cni"
    runtime = cni_runtime(lab, entry["node"])
    args = {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": entry["namespace"],
        "K8S_POD_NAME": entry["name"],
    }
    att = Attachment(entry["containerID"], pod_ns, args=args)
    for conf_name, ifname in (
        (f"veil-{lab}-{entry['node']}", "eth0"),
        (LOOPBACK_CONFIG["name"], "lo"),
    ):
        f = cache / f"{conf_name}-{att.container_id}-{ifname}.json"
        if f.exists():
            try:
                runtime.delete(
                    json.loads(f.read_text())["config"],
                    Attachment(att.container_id, pod_ns, ifname, args),
                )
            except CniError as e:
                log(f"warning: {e}")


# -- waypoints of Gateways applied after `lab up` (manifest mode) ------------------------------


def start_waypoint(lab: str, record: dict[str, Any], gateway: Object, log: Log) -> list[str]:
    """What the waypoint controller does on Kubernetes, for a Gateway applied to a running
    lab: its pods (those it does not have yet) placed on the least loaded nodes, each with a
    token for its own identity only, started and waited for. Its pods' names."""
    plan = make_plan(
        load_paths(record["manifests"]),
        lab,
        len(record["nodes"]),
        recorded_mask(record["nodes"][0]["podCIDR"]),
    )
    have = {(e["namespace"], e["name"]) for e in record["pods"]}
    load = {n.name: 0 for n in plan.nodes}
    for e in record["pods"]:
        load[e["node"]] = load.get(e["node"], 0) + 1
    new = []
    for wp in waypoint_pods(gateway):
        if (wp.namespace, wp.name) in have:
            continue
        node = min(plan.nodes, key=lambda n: load[n.name]).name  # ties: the first node
        load[node] += 1
        new.append(dataclasses.replace(wp, node=node))
    if not new:
        return []
    controlplane.add_waypoint_credentials(lab, new)
    record["pods"] += [pod_entry(lab, Path(record["cgroup"]), p) for p in new]
    store.write_record(lab, record)
    running = [start_pod(plan, p, record, log) for p in new]
    store.write_record(lab, record)
    wait_ready(plan, running, READY_TIMEOUT, lambda _m: None)
    return [f"{p.namespace}/{p.name}" for p in new]


def stop_waypoint(lab: str, record: dict[str, Any], namespace: str, gateway: str) -> list[str]:
    """A removed Gateway's pods: killed, their network removed (CNI DEL), forgotten."""
    state = store.state_dir(lab)
    gone = [
        e
        for e in record["pods"]
        if e["namespace"] == namespace
        and (pod := store.read_object(state, "Pod", namespace, e["name"])) is not None
        and (pod["metadata"].get("labels") or {}).get(GATEWAY_NAME_LABEL) == gateway
    ]
    present = netns.listing()
    for e in gone:
        cgroups.kill_and_remove(Path(e["cgroup"]))
        cni_delete(lab, e, present, print)
        netns.delete(e["netns"])
        shutil.rmtree(ETC_NETNS / e["netns"], ignore_errors=True)
        store.object_path(state, "Pod", namespace, e["name"]).unlink(missing_ok=True)
        record["pods"].remove(e)
    store.write_record(lab, record)
    return [f"{e['namespace']}/{e['name']}" for e in gone]


def kubelet_pods(lab: str, host_network: bool = False) -> list[dict[str, Any]]:
    """The pods kubernetes mode's kubelets run (their registries); hostNetwork ones only if
    asked for."""
    out = []
    for f in sorted((store.lab_dir(lab) / "kubelet").glob("*/*.json")):
        with contextlib.suppress(OSError, ValueError):
            entry = json.loads(f.read_text())
            if host_network or not entry.get("hostNetwork"):
                out.append(entry)
    return out


def agent_log(lab: str, node: str) -> Path:
    """A node's agent log: the lab's process, or with the chart its DaemonSet pod's (the
    newest, after an upgrade)."""
    logs = store.lab_dir(lab) / "logs"
    if store.chart_mode(lab):
        pods = [
            p
            for p in kubelet_pods(lab, host_network=True)
            if p.get("node") == node and str(p.get("name", "")).startswith("veil-agent-")
        ]
        found = sorted(
            (logs / f"{p['namespace']}_{p['name']}_agent.log" for p in pods),
            key=lambda f: f.stat().st_mtime if f.exists() else 0,
        )
        if found:
            return found[-1]
    return logs / f"agent-{node}.log"


def remove_mountpoints(lab: str) -> list[str]:
    """The bind-mount targets the kubelets had to create on the host (lab/kubelet.py), if
    still empty: deepest first."""
    listing = store.lab_dir(lab) / "kubelet" / "mountpoints"
    if not listing.exists():
        return []
    removed = []
    paths = {Path(line) for line in listing.read_text().splitlines() if line.strip()}
    for p in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            elif p.is_file() and p.stat().st_size == 0:
                p.unlink()
            else:
                continue
            removed.append(str(p))
        except OSError:
            pass  # not empty, or in use: left as it is
    return removed


def down_all(log: Log = print) -> None:
    names = set(store.labs())
    names |= {
        n.split("-")[1] for n in netns.listing() if n.startswith("veil-") and n.count("-") >= 2
    }
    for name in sorted(names):
        try:
            check_lab_name(name)
        except ValueError:
            continue
        down(name, log)


# -- status and exec --------------------------------------------------------------------------


def _alive(pid: int, group: str) -> bool:
    if not procfs.running(pid):
        return False
    try:
        cg = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(
        line.split(":", 2)[2].strip() and group.endswith(line.split(":", 2)[2].strip())
        for line in cg.splitlines()
        if line.startswith("0::")
    )


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def status(lab: str) -> dict[str, Any]:
    record = store.read_record(lab)
    if record is None:
        raise LabError(f"lab {lab!r} is not up (no {store.lab_dir(lab) / 'lab.yaml'})")
    if record.get("kubernetes"):  # the API server holds the truth, the kubelets report to it
        from veil.lab import kubernetes as k8s  # noqa: PLC0415

        try:
            got = k8s.kubectl(lab, "get", "pods,services,endpointslices", "-A", "-o", "json")
            objects = json.loads(got)["items"]
        except (LabError, subprocess.TimeoutExpired, ValueError):
            objects = []
    else:
        objects = list(store.read_objects(store.state_dir(lab)))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    pids = {
        (e["namespace"], e["name"]): (e.get("pids", []), e["cgroup"])
        for e in record.get("pods", [])
    }
    restarts = {
        (e["namespace"], e["name"]): sum(
            int(supervise.read_state(Path(f)).get("restarts", 0)) for f in e.get("states", [])
        )
        for e in record.get("pods", [])
    }
    pods = []
    for p in by_kind.get("Pod", []):
        md, st = p["metadata"], p.get("status", {})
        phase = st.get("phase", "Pending")
        plist, group = pids.get((md["namespace"], md["name"]), ([], ""))
        if phase == "Running" and not all(_alive(pid, group) for pid in plist):
            phase = "Failed"
        pods.append(
            {
                "namespace": md["namespace"],
                "name": md["name"],
                "ip": st.get("podIP", ""),
                "node": p["spec"].get("nodeName", ""),
                "phase": phase,
                "labels": md.get("labels") or {},
                "restarts": restarts.get((md["namespace"], md["name"]), 0)
                + sum(int(c.get("restartCount", 0)) for c in st.get("containerStatuses") or []),
            }
        )
    slices = {
        (s["metadata"]["namespace"], s["metadata"].get("labels", {}).get(SERVICE_NAME_LABEL, "")): s
        for s in by_kind.get("EndpointSlice", [])
    }
    services = []
    for s in by_kind.get("Service", []):
        md = s["metadata"]
        sl = slices.get((md["namespace"], md["name"]), {})
        target_ports = [p["port"] for p in sl.get("ports", [])]
        eps = [
            f"{a}:{tp}"
            for e in sl.get("endpoints", [])
            for a in e["addresses"]
            for tp in target_ports[:1]
            if (e.get("conditions") or {}).get("ready", True)
        ]
        services.append(
            {
                "namespace": md["namespace"],
                "name": md["name"],
                "clusterIP": s["spec"].get("clusterIP", ""),
                "ports": [p["port"] for p in s["spec"].get("ports", [])],
                "endpoints": eps,
            }
        )
    processes = [
        {
            "name": p["name"],
            "netns": p["netns"],
            "pid": v["pid"],
            "phase": "Running" if _alive(v["pid"], p.get("cgroup", "")) else "Failed",
            "restarts": v["restarts"],
        }
        for p in record.get("processes", [])
        if (v := controlplane.process_view(p))
    ]
    return {
        "name": lab,
        "status": record.get("status"),
        "state": str(store.state_dir(lab)),
        "nodes": record.get("nodes", []),
        "processes": processes,
        "pods": sorted(pods, key=lambda p: (p["namespace"], p["name"])),
        "services": sorted(services, key=lambda s: (s["namespace"], s["name"])),
    }


def format_status(st: Mapping[str, Any]) -> str:
    lines = [
        f"lab {st['name']}: {st['status']}   (state: {st['state']})",
        "",
        f"NODES {'NAME':<10} {'UNDERLAY-IP':<15} {'POD-CIDR':<18} NETNS",
    ]
    lines += [
        f"      {n['name']:<10} {n['underlayIP']:<15} {n['podCIDR']:<18} {n['netns']}"
        for n in st["nodes"]
    ]
    procs = st.get("processes", [])
    w = max([14, *(len(p["name"]) for p in procs)])  # kube-controller-manager, in kubernetes mode
    lines += ["", f"MESH  {'PROCESS':<{w}} {'PID':<8} {'PHASE':<9} {'RESTARTS':<9} NETNS"]
    lines += [
        f"      {p['name']:<{w}} {p['pid']:<8} {p['phase']:<9} {p.get('restarts', 0):<9} "
        f"{p['netns']}"
        for p in procs
    ]
    lines += [
        "",
        f"PODS  {'NAMESPACE':<14} {'POD':<24} {'IP':<15} {'NODE':<10} {'PHASE':<9} RESTARTS",
    ]
    lines += [
        f"      {p['namespace']:<14} {p['name']:<24} {p['ip']:<15} {p['node']:<10} "
        f"{p['phase']:<9} {p.get('restarts', 0)}"
        for p in st["pods"]
    ]
    lines += [
        "",
        f"SERVICES  {'NAMESPACE':<14} {'NAME':<20} {'CLUSTER-IP':<15} {'PORTS':<10} ENDPOINTS",
    ]
    lines += [
        f"          {s['namespace']:<14} {s['name']:<20} {s['clusterIP']:<15} "
        f"{','.join(map(str, s['ports'])):<10} {', '.join(s['endpoints']) or '<none>'}"
        for s in st["services"]
    ]
    return "\n".join(lines)


def find_pod(lab: str, pod: str, namespace: str | None) -> dict[str, Any]:
    """A pod by name, or `deploy/<name>` for a Deployment's first pod, as kubectl exec does."""
    record = store.read_record(lab)
    if record is None:
        raise LabError(f"lab {lab!r} is not up: start it with `veil lab up -f <dir>`")
    pods = [*record.get("pods", []), *kubelet_pods(lab, host_network=True)]
    if namespace:
        pods = [p for p in pods if p["namespace"] == namespace]
    if pod.startswith(("deploy/", "deployment/")):
        owner = pod.split("/", 1)[1]
        # <deployment>-<n> in manifest mode, <deployment>-<replicaset hash>-<id> in kubernetes
        matches = [p for p in pods if owner in (p["name"].rsplit("-", i)[0] for i in (1, 2))]
        matches = sorted(matches, key=lambda p: str(p["name"]))[:1]
    else:
        matches = [p for p in pods if p["name"] == pod]
    if not matches:
        where = f" in namespace {namespace!r}" if namespace else ""
        known = ", ".join(f"{p['namespace']}/{p['name']}" for p in pods)
        raise LabError(f"no pod {pod!r}{where} in lab {lab!r} (pods: {known})")
    if len(matches) > 1:
        raise LabError(
            f"pod name {pod!r} exists in several namespaces "
            f"({', '.join(p['namespace'] for p in matches)}): pass -n <namespace>"
        )
    return dict(matches[0])


def exec_in_pod(lab: str, pod: str, namespace: str | None, argv: Sequence[str]) -> NoReturn:
    """Replace this process with argv inside the pod: its netns, /etc/hosts and cgroup."""
    if not argv:
        raise LabError("nothing to run: veil lab exec <pod> -- <command> [args...]")
    entry = find_pod(lab, pod, namespace)
    os.environ.update({"POD_NAME": entry["name"], "POD_NAMESPACE": entry["namespace"]})
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    if "uid" in entry:  # run by a kubelet (kubernetes mode): join a container's namespaces
        alive = [pid for pid in entry.get("pids", []) if Path(f"/proc/{pid}").exists()]
        if not alive:
            raise LabError(f"pod {entry['namespace']}/{entry['name']} has no running container")
        cgroups.join(Path(entry["cgroup"]))
        # The container's own environment, as `kubectl exec` gives it.
        environ = Path(f"/proc/{alive[0]}/environ").read_bytes().split(b"\0")
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        args = ["nsenter", "-t", str(alive[0]), "--net", "--mount", "--", *argv]
        os.execvpe(args[0], args, env)
    if not netns.exists(entry["netns"]):
        raise LabError(
            f"pod {entry['namespace']}/{entry['name']} has no network namespace "
            f"{entry['netns']}: the lab is broken, run `veil lab down --name {lab}`"
        )
    cgroups.join(Path(entry["cgroup"]))
    args = netns.exec_argv(entry["netns"], argv)
    os.execvp(args[0], args)


def label(
    lab: str, kind: str, name: str, namespace: str | None, changes: Sequence[str]
) -> dict[str, str]:
    """Change labels of a running Namespace or Pod, as `kubectl label` would (`k=v`, `k-`)."""
    from veil.lab.manifests import LABEL_KEY, LABEL_VALUE  # noqa: PLC0415

    kinds = {"namespace": "Namespace", "ns": "Namespace", "pod": "Pod", "po": "Pod"}
    if kind not in kinds:
        raise LabError(f"cannot label {kind!r}: use namespace or pod")
    kind = kinds[kind]
    record = store.read_record(lab)
    if record is None:
        raise LabError(f"lab {lab!r} is not up")
    if not changes:
        raise LabError("no label changes given: use key=value to set, key- to remove")
    if record.get("kubernetes"):  # the API server holds the object: kubectl label it
        from veil.lab import kubernetes as k8s  # noqa: PLC0415

        scope = ["-n", namespace or "default"] if kind == "Pod" else []
        out = k8s.kubectl(
            lab, "label", "--overwrite", kind.lower(), name, *scope, *changes, "-o", "json"
        )
        return dict(json.loads(out)["metadata"].get("labels") or {})
    path = store.object_path(
        store.state_dir(lab), kind, (namespace or "default") if kind == "Pod" else None, name
    )
    if not path.exists():
        where = f" in namespace {namespace or 'default'}" if kind == "Pod" else ""
        raise LabError(f"no {kind} {name!r}{where} in lab {lab!r}")
    doc = yaml.safe_load(path.read_text())
    labels: dict[str, str] = dict(doc["metadata"].get("labels") or {})
    for change in changes:
        if change.endswith("-") and "=" not in change:
            labels.pop(change[:-1], None)
            continue
        key, sep, value = change.partition("=")
        if not sep or not LABEL_KEY.match(key) or not LABEL_VALUE.match(value) or len(value) > 63:
            raise LabError(f"invalid label change {change!r}: use key=value or key-")
        labels[key] = value
    doc["metadata"]["labels"] = labels
    store.write_object(store.state_dir(lab), doc)
    return labels


LIFECYCLE_KINDS = ("Namespace", "ServiceAccount", "Pod", "Deployment", "Service")


def apply(lab: str, paths: Sequence[str | Path]) -> list[str]:
    """Add or replace stored objects (AuthorizationPolicy, Gateway, HTTPRoute, ...) at runtime.

    Objects the lab runs itself (pods, services, ...) are set at `lab up`: changing them would
    need their lifecycle, so they are refused here with a clear error.
    """
    record = store.read_record(lab)
    if record is None:
        raise LabError(f"lab {lab!r} is not up")
    objects = load_paths(paths)
    if record.get("kubernetes"):  # any kind: the API server validates, the kubelets run pods
        from veil.lab import kubernetes as k8s  # noqa: PLC0415

        k8s.apply_manifests(lab, paths)
        return [o.ref for o in objects]
    for o in objects:
        if o.kind in LIFECYCLE_KINDS:
            raise LabError(
                f"{o.origin}: {o.ref}: the lab creates {o.kind}s at `lab up` only; "
                "`apply` takes stored kinds such as AuthorizationPolicy"
            )
        if (
            o.meta.namespace
            and not store.object_path(
                store.state_dir(lab), "Namespace", None, o.meta.namespace
            ).exists()
        ):
            raise LabError(f"{o.origin}: {o.ref}: namespace {o.meta.namespace!r} does not exist")
    done = []
    for o in objects:
        store.write_object(store.state_dir(lab), {**o.raw, "metadata": _meta(o)})
        done.append(o.ref)
    for o in objects:  # as the waypoint controller would: the Gateway's pods, once it exists
        if waypoint_pods(o):
            done += [f"pod {p} (waypoint)" for p in start_waypoint(lab, record, o, print)]
    return done


def delete(lab: str, kind: str, name: str, namespace: str | None) -> str:
    kinds = {
        "authorizationpolicy": "AuthorizationPolicy",
        "gateway": "Gateway",
        "httproute": "HTTPRoute",
        "grpcroute": "GRPCRoute",
        "tcproute": "TCPRoute",
        "referencegrant": "ReferenceGrant",
        "requestauthentication": "RequestAuthentication",
        "trafficpolicy": "TrafficPolicy",
        "configmap": "ConfigMap",
    }
    real = kinds.get(kind.lower(), kind)
    record = store.read_record(lab) or {}
    if record.get("kubernetes"):
        from veil.lab import kubernetes as k8s  # noqa: PLC0415

        k8s.kubectl(lab, "delete", kind.lower(), name, "-n", namespace or "default")
        return f"{real} {namespace or 'default'}/{name}"
    if real in LIFECYCLE_KINDS:
        raise LabError(f"the lab removes {real}s with `lab down` only")
    path = store.object_path(store.state_dir(lab), real, namespace or "default", name)
    if not path.exists():
        raise LabError(f"no {real} {namespace or 'default'}/{name} in lab {lab!r}")
    path.unlink()
    if real == "Gateway":  # its waypoint pods go with it
        stop_waypoint(lab, record, namespace or "default", name)
    return f"{real} {namespace or 'default'}/{name}"
