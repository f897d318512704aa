"""The lab's control plane and node agents: `veil ca` in its own netns, `veil agent` per node.

The CA runs in `veil-<lab>-cp`, a netns on the underlay (172.30.0.2) standing in for a
control-plane node; it reads the lab's state directory to know which identities run where.
Each node gets a bootstrap credential in its own directory (`nodes/<node>/bootstrap-token`,
mode 0600; the CA keeps only its SHA-256) and the CA's trust anchor (`nodes/<node>/ca-root.pem`),
as a DaemonSet pod would get a projected token and the root ConfigMap. The agent of each node
runs in the node's netns, as the hostNetwork DaemonSet pod would on a real node.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import yaml

from veil.ca.auth import new_token, token_hash, write_tokens_file
from veil.core.spiffe import DEFAULT_TRUST_DOMAIN
from veil.core.state import GATEWAY_NAME_LABEL
from veil.lab import cgroups, netns, procfs, store, supervise
from veil.lab.errors import LabError
from veil.lab.plan import UNDERLAY_CIDR, LabPlan, PodPlan
from veil.runtime.config import CA_SERVER_NAME

CA_IP = UNDERLAY_CIDR.network_address + 2
CA_PORT = 15012
CA_METRICS_PORT = 15014
AGENT_READY_PORT = 15021
TOKEN_LIFETIME = datetime.timedelta(days=7)

Log = Callable[[str], None]
Spawn = Callable[[str, Sequence[str], dict[str, str], Path, Path], "subprocess.Popen[bytes]"]


def cp_netns(lab: str) -> str:
    return f"veil-{lab}-cp"


def node_dir(lab: str, node: str) -> Path:
    return store.lab_dir(lab) / "nodes" / node


def cni_socket(lab: str, node: str) -> Path:
    return node_dir(lab, node) / "cni.sock"


def kube_dir(lab: str) -> Path:
    """Kubernetes mode's PKI, kubeconfigs and etcd data (lab/kubernetes.py)."""
    return store.lab_dir(lab) / "kubernetes"


def agent_kubeconfig(lab: str, node: str) -> Path:
    return kube_dir(lab) / f"agent-{node}.kubeconfig"


def ca_kubeconfig(lab: str) -> Path:
    return kube_dir(lab) / "veil-ca.kubeconfig"


def ca_dir(lab: str) -> Path:
    return store.lab_dir(lab) / "ca"


def veil_argv(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "veil"), *args]


def daemon_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }


def build_cp_netns(lab: str, underlay: str, routes: Sequence[tuple[str, str]] = ()) -> None:
    """The control-plane netns on the underlay; `routes` (pod CIDR, node IP) let pods that
    talk to the CA themselves (waypoints) be answered."""
    ns = cp_netns(lab)
    netns.add(ns)
    netns.ip(underlay, "link", "add", "cp", "type", "veth", "peer", "name", "eth0", "netns", ns)
    netns.ip(underlay, "link", "set", "cp", "master", "br0", "up")
    netns.ip(ns, "addr", "add", f"{CA_IP}/{UNDERLAY_CIDR.prefixlen}", "dev", "eth0")
    netns.ip(ns, "link", "set", "eth0", "up")
    for cidr, via in routes:
        netns.ip(ns, "route", "add", cidr, "via", via)


def pod_dir(lab: str, namespace: str, name: str) -> Path:
    return store.lab_dir(lab) / "pods" / f"{namespace}_{name}"


def write_node_credentials(plan: LabPlan, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
    """A bootstrap token per node (its agent), and per waypoint pod a token good only for its
    own identity (what its projected service-account token would be on Kubernetes)."""
    expiry = datetime.datetime.now(datetime.UTC) + TOKEN_LIFETIME
    tokens = {n.name: (new_token(), expiry) for n in plan.nodes}
    workloads = []
    for p in plan.pods:
        if p.labels.get(GATEWAY_NAME_LABEL):
            token = new_token()
            identity = f"spiffe://{trust_domain}/ns/{p.namespace}/sa/{p.spec.service_account}"
            workloads.append((p.node, identity, token, expiry))
            d = pod_dir(plan.name, p.namespace, p.name)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            store.atomic_write(d / "token", token + "\n", mode=0o600)
    ca = ca_dir(plan.name)
    ca.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_tokens_file(ca / "bootstrap-tokens.yaml", tokens, workloads)
    for node, (token, _) in tokens.items():
        d = node_dir(plan.name, node)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        store.atomic_write(d / "bootstrap-token", token + "\n", mode=0o600)


def add_waypoint_credentials(
    lab: str, pods: Sequence[PodPlan], trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> None:
    """Tokens for waypoint pods started after `lab up`, added to the CA's file (it re-reads
    it when it changes)."""
    path = ca_dir(lab) / "bootstrap-tokens.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    expiry = datetime.datetime.now(datetime.UTC) + TOKEN_LIFETIME
    for p in pods:
        token = new_token()
        identity = f"spiffe://{trust_domain}/ns/{p.namespace}/sa/{p.spec.service_account}"
        doc.setdefault("tokens", []).append(
            {
                "node": p.node,
                "identity": identity,
                "sha256": token_hash(token),
                "expires": expiry.isoformat(),
            }
        )
        d = pod_dir(lab, p.namespace, p.name)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        store.atomic_write(d / "token", token + "\n", mode=0o600)
    store.atomic_write(path, yaml.safe_dump(doc), mode=0o600)


@dataclass
class Daemon:
    name: str
    netns: str
    proc: subprocess.Popen[bytes]  # its supervisor (lab/supervise.py)
    port: int
    logfile: Path
    state: Path | None = None  # the supervisor's state file: the daemon's pid, restarts

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "netns": self.netns,
            "pid": self.proc.pid,
            "log": str(self.logfile),
            **({"state": str(self.state)} if self.state else {}),
        }

    def restarts(self) -> int:
        return int(supervise.read_state(self.state).get("restarts", 0)) if self.state else 0


def supervised(lab: str, name: str, argv: Sequence[str]) -> tuple[list[str], Path]:
    """`argv` under the lab's supervisor (restarted whenever it ends, as `restartPolicy:
    Always`), and the state file that tells its pid and restarts."""
    state = store.lab_dir(lab) / "supervise" / f"{name.replace(' ', '-')}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.unlink(missing_ok=True)
    return [sys.executable, "-m", "veil.lab.supervise", str(state), "--", *argv], state


def wait_listening(daemons: Sequence[Daemon], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(daemons)
    while pending:
        for d in list(pending):
            if d.proc.poll() is not None or d.restarts():
                tail = d.logfile.read_text(errors="replace").splitlines()[-15:]
                raise LabError(
                    f"{d.name} exited while starting; its log:\n"
                    + "\n".join(f"    {line}" for line in tail)
                )
            if d.port in netns.listening_ports(d.proc.pid):
                pending.remove(d)
        if pending and time.monotonic() > deadline:
            raise LabError(
                f"{', '.join(d.name for d in pending)} not listening after "
                f"{timeout:.0f}s (see {pending[0].logfile})"
            )
        time.sleep(0.05)


def state_source(lab: str, kubeconfig: Path | None) -> list[str]:
    if kubeconfig is not None:
        return ["--kubeconfig", str(kubeconfig)]
    return ["--state-dir", str(store.state_dir(lab))]


def ca_storage(kubeconfig: Path | None) -> list[str]:
    """Kubernetes mode: the CA keeps its root in a Secret (as replicas on a cluster do)."""
    return ["--ca-secret", "veil-system/veil-ca"] if kubeconfig is not None else []


def start_ca(
    plan: LabPlan,
    spawn: Spawn,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    cert_ttl: int | None = None,
    kubeconfig: Path | None = None,
) -> Daemon:
    """`kubeconfig`: the CA reads the Kubernetes API (kubernetes mode), not the state dir."""
    lab = plan.name
    group = cgroups.create(cgroups.lab_group(lab) / "control-plane" / "ca")
    log = store.lab_dir(lab) / "logs" / "ca.log"
    argv = veil_argv(
        "ca",
        *state_source(lab, kubeconfig),
        *ca_storage(kubeconfig),
        "--data-dir",
        str(ca_dir(lab)),
        "--node-tokens",
        str(ca_dir(lab) / "bootstrap-tokens.yaml"),
        "--trust-domain",
        trust_domain,
        "--listen",
        f"{CA_IP}:{CA_PORT}",
        "--metrics-listen",
        f"{CA_IP}:{CA_METRICS_PORT}",
        *(["--ttl", str(cert_ttl)] if cert_ttl else []),
    )
    argv, state = supervised(lab, "ca", argv)
    proc = spawn(cp_netns(lab), argv, daemon_env(), group, log)
    return Daemon("ca", cp_netns(lab), proc, CA_PORT, log, state)


def distribute_trust_bundle(plan: LabPlan) -> None:
    bundle = (ca_dir(plan.name) / "trust-bundle.pem").read_text()
    for n in plan.nodes:
        store.atomic_write(node_dir(plan.name, n.name) / "ca-root.pem", bundle)


def recorded_workers(record: Mapping[str, Any]) -> dict[str, int]:
    """Each node's agent workers, as `lab up` recorded them (1 in labs made before)."""
    return {n["name"]: int(n.get("workers", 1)) for n in record.get("nodes", [])}


def start_agents(
    plan: LabPlan,
    spawn: Spawn,
    node_netns: Callable[[str, str], str],
    capture: Mapping[str, str] | None = None,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    kubeconfigs: Mapping[str, Path] | None = None,
    extra_env: Mapping[str, str] | None = None,
    workers: Mapping[str, int] | None = None,
) -> list[Daemon]:
    """`kubeconfigs` (node -> file): the agents read the Kubernetes API (kubernetes mode).
    `workers` (node -> count): the agents' worker processes (default 1)."""
    lab = plan.name
    out = []
    for n in plan.nodes:
        mode = (capture or {}).get(n.name, "iptables")
        group = cgroups.create(cgroups.lab_group(lab) / "nodes" / n.name / "agent")
        log = store.lab_dir(lab) / "logs" / f"agent-{n.name}.log"
        d = node_dir(lab, n.name)
        argv = veil_argv(
            "agent",
            "--node",
            n.name,
            *state_source(lab, (kubeconfigs or {}).get(n.name)),
            "--ca-address",
            f"{CA_IP}:{CA_PORT}",
            "--ca-server-name",
            CA_SERVER_NAME,
            "--ca-root",
            str(d / "ca-root.pem"),
            "--token-file",
            str(d / "bootstrap-token"),
            "--trust-domain",
            trust_domain,
            "--data-dir",
            str(d / "agent"),
            "--cni-socket",
            str(cni_socket(lab, n.name)),
            "--capture",
            mode,
            "--bpf-pin-dir",
            str(bpf_lab_dir(lab) / n.name),
            "--workers",
            str((workers or {}).get(n.name, 1)),
        )
        ns = node_netns(lab, n.name)
        if extra_env:  # the agent's alone, not its supervisor's
            argv = ["env", *(f"{k}={v}" for k, v in extra_env.items()), *argv]
        argv, state = supervised(lab, f"agent {n.name}", argv)
        out.append(
            Daemon(
                f"agent {n.name}",
                ns,
                spawn(ns, argv, daemon_env(), group, log),
                AGENT_READY_PORT,
                log,
                state,
            )
        )
    return out


def waypoint_env(lab: str, namespace: str, name: str, node: str) -> dict[str, str]:
    """How a waypoint pod finds the cluster state, the CA and its own credential."""
    return {
        "VEIL_STATE_DIR": str(store.state_dir(lab)),
        "VEIL_CA_ADDRESS": f"{CA_IP}:{CA_PORT}",
        "VEIL_CA_ROOT": str(node_dir(lab, node) / "ca-root.pem"),
        "VEIL_TOKEN_FILE": str(pod_dir(lab, namespace, name) / "token"),
    }


def bpf_lab_dir(lab: str) -> Path:
    """Where the lab's eBPF-mode agents pin their maps (one directory per node)."""
    return Path("/sys/fs/bpf/veil/lab") / lab


def agent_get(ns: str, path: str, port: int = 15000, timeout: float = 3.0) -> tuple[int, str]:
    """GET a URL of a node agent from inside its netns (the admin port is node-local)."""
    proc = netns.run(
        netns.nsenter_argv(
            ns,
            [
                "curl",
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "--max-time",
                str(timeout),
                f"http://127.0.0.1:{port}{path}",
            ],
        ),
        check=False,
        timeout=timeout + 2,
    )
    body, _, code = proc.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def wait_agents_ready(daemons: Sequence[Daemon], timeout: float) -> None:
    """Ready = the agent has read the state and holds a certificate for each node identity."""
    deadline = time.monotonic() + timeout
    pending = list(daemons)
    last = ""
    while pending:
        for d in list(pending):
            if d.proc.poll() is not None:
                raise LabError(f"{d.name} exited with code {d.proc.returncode} (see {d.logfile})")
            code, body = agent_get(d.netns, "/healthz/ready", AGENT_READY_PORT)
            if code == 200:
                pending.remove(d)
            else:
                last = f"{d.name}: {body.strip() or code}"
        if pending and time.monotonic() > deadline:
            raise LabError(f"agents not ready after {timeout:.0f}s: {last}")
        time.sleep(0.1)


def ca_address() -> tuple[IPv4Address, int]:
    return CA_IP, CA_PORT


def process_view(p: Mapping[str, Any]) -> dict[str, Any]:
    """A daemon's record with `pid` the daemon's own (not its supervisor's, `supervisor`) and
    its `restarts`."""
    out = dict(p)
    st = supervise.read_state(Path(p["state"])) if p.get("state") else {}
    if st.get("pid"):
        out["supervisor"], out["pid"] = p["pid"], int(st["pid"])
    out["restarts"] = int(st.get("restarts", 0))
    return out


def agent_process(lab: str, node: str) -> dict[str, Any]:
    record = store.read_record(lab) or {}
    for p in record.get("processes", []):
        if p["name"] == f"agent {node}":
            return process_view(p)
    raise LabError(f"no agent for node {node!r} in lab {lab!r}")


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while procfs.running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def stop_agent(lab: str, node: str, signal: int = 9) -> None:
    """SIGKILL a node's agent, as a crash would (capture stays in the pods); any other signal
    stops it on purpose, at once (its supervisor stops it with SIGINT: no hand-over). Either
    way it stays stopped (its supervisor goes first). Returns once the processes are gone."""
    p = agent_process(lab, node)
    supervisor = p.get("supervisor")
    if supervisor is not None:
        try:
            os.kill(supervisor, 9 if signal == 9 else 15)
        except ProcessLookupError:
            pass
        else:
            if signal != 9:
                _wait_gone(p["pid"])
                _wait_gone(supervisor)
                return
            _wait_gone(supervisor)
    try:
        os.kill(p["pid"], 9 if signal == 9 else 2)
    except ProcessLookupError:
        return
    _wait_gone(p["pid"])
    if supervisor is not None:
        _wait_gone(supervisor)


def hand_over_agent(lab: str, node: str, timeout: float = 60.0) -> tuple[int, int]:
    """`kill -TERM` a node's agent, as an operator would: its supervisor starts the next one,
    which takes the pods' listeners over while the old one drains. Returns (old pid, new pid)
    once the new one is ready; the old one may still be draining."""
    p = agent_process(lab, node)
    old = int(p["pid"])
    os.kill(old, 15)
    deadline = time.monotonic() + timeout
    while (new := int(agent_process(lab, node)["pid"])) == old:
        if time.monotonic() > deadline:
            raise LabError(f"agent {node}: no successor started within {timeout:.0f}s")
        time.sleep(0.05)
    ns = str(p["netns"])
    while True:  # the admin port is the new agent's once the old one released it
        code, body = agent_get(ns, "/config_dump")
        if (
            code == 200
            and json.loads(body).get("pid") == new
            and agent_get(ns, "/healthz/ready", AGENT_READY_PORT)[0] == 200
        ):
            return old, new
        if time.monotonic() > deadline:
            raise LabError(f"agent {node}: the new agent (pid {new}) not ready in {timeout:.0f}s")
        time.sleep(0.1)


def start_agent(
    lab: str,
    node: str,
    spawn: Spawn,
    node_netns: Callable[[str, str], str],
    timeout: float = 30.0,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> int:
    """Start a node's agent again (it resumes its pods from its registry); returns the pid.
    `extra_env`: more environment for it (fault injection: a moved clock, say)."""
    from veil.lab.plan import NodePlan, recorded_mask  # noqa: PLC0415

    record = store.read_record(lab) or {}
    index, entry = next(
        (i, n) for i, n in enumerate(record.get("nodes", []), 1) if n["name"] == node
    )
    plan = LabPlan(
        name=lab,
        nodes=(NodePlan(node, index, recorded_mask(entry["podCIDR"])),),
        namespaces=(),
        service_accounts=(),
        deployments=(),
        pods=(),
        services=(),
        others=(),
    )
    mode = record["nodes"][index - 1].get("capture", "iptables")
    kubeconfigs = None
    if record.get("kubernetes"):
        kubeconfigs = {node: agent_kubeconfig(lab, node)}
    (daemon,) = start_agents(
        plan,
        spawn,
        node_netns,
        {node: mode},
        kubeconfigs=kubeconfigs,
        extra_env=extra_env,
        workers=recorded_workers(record),
    )
    wait_listening([daemon], timeout)
    wait_agents_ready([daemon], timeout)
    for p in record["processes"]:
        if p["name"] == daemon.name:
            p.update(daemon.record())
    store.write_record(lab, record)
    return int(agent_process(lab, node)["pid"])


def ca_request(
    lab: str, node: str, body: dict[str, Any], token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST /v1/certificates to the lab's CA with curl from inside a node's netns, as that node
    (its bootstrap credential unless `token` is given); returns the status and the JSON answer."""
    d = node_dir(lab, node)
    token = token if token is not None else (d / "bootstrap-token").read_text().strip()
    proc = netns.run(
        netns.nsenter_argv(
            f"veil-{lab}-{node}",
            [
                "curl",
                "-s",
                "--tlsv1.3",
                "--cacert",
                str(d / "ca-root.pem"),
                "--resolve",
                f"{CA_SERVER_NAME}:{CA_PORT}:{CA_IP}",
                "-w",
                "\n%{http_code}",
                "-H",
                f"Authorization: Bearer {token}",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                json.dumps(body),
                f"https://{CA_SERVER_NAME}:{CA_PORT}/v1/certificates",
            ],
        ),
        timeout=15,
    )
    text, _, code = proc.stdout.rpartition("\n")
    answer: dict[str, Any] = json.loads(text)
    return int(code), answer
