"""Agent and CA configuration: parsed once into immutable objects (pure construction)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from veil.core.ports import ADMIN_PORT, CA_METRICS_PORT, CA_PORT, METRICS_PORT, READY_PORT
from veil.core.spiffe import DEFAULT_TRUST_DOMAIN, check_trust_domain

CA_SERVER_NAME = "veil-ca.veil-system.svc"
MAX_WORKERS = 64


def default_workers(cap: int, cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """One worker per core this process may use, at most `cap`: the cores it may run on
    (cpuset), fewer if its cgroup's CPU quota is smaller (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(cap, cores))


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r}: expected host:port")
        return value, default_port
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{value!r}: port {number} is outside 0-65535")
    return host.strip("[]") or "0.0.0.0", number


def check_state_source(state_dir: Path | None, kubeconfig: str | None) -> None:
    if (state_dir is None) == (kubeconfig is None):
        raise ValueError("give exactly one state source: --state-dir DIR or --kubeconfig PATH")


@dataclass(frozen=True)
class AgentConfig:
    node: str
    state_dir: Path | None
    ca_address: tuple[str, int]
    ca_server_name: str
    ca_root: Path
    token_file: Path
    data_dir: Path = Path("/var/run/veil/agent")
    cni_socket: Path = Path("/var/run/veil/cni.sock")
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    admin_listen: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_listen: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    ready_listen: tuple[str, int] = ("0.0.0.0", READY_PORT)
    capture: str = "iptables"
    bpf_pin_dir: Path = Path("/sys/fs/bpf/veil")
    kubeconfig: str | None = None  # the Kubernetes API as the state source, not state_dir
    host_proc: Path = Path("/proc")  # the node's /proc: a running pod is found there
    handover_wait: float = 20.0  # after SIGTERM: seconds serving on while a successor comes
    drain: float = 30.0  # after a hand-over: seconds the connections in hand may take to end
    # The CNI installer (a DaemonSet pod): the host's CNI dirs as mounted, what veil-cni's entry
    # says (agentSocket: the CNI socket's path on the host), and who passes through.
    cni_bin_dir: Path | None = None
    cni_conf_dir: Path | None = None
    cni_host_socket: str | None = None  # default: cni_socket (mounted at the same path)
    cni_exclude_namespaces: tuple[str, ...] = ("kube-system",)
    daemonset: str | None = None  # namespace/name: once it is deleted, a stop uninstalls
    workers: int = 1  # 1: this process serves the pods; N: N worker processes (agent/workers.py)

    def __post_init__(self) -> None:
        check_state_source(self.state_dir, self.kubeconfig)
        check_trust_domain(self.trust_domain)
        if self.capture not in ("iptables", "ebpf"):
            raise ValueError(f"--capture {self.capture!r}: use iptables or ebpf")
        if not self.node:
            raise ValueError("--node is required: the name of the node this agent runs on")
        if (self.cni_bin_dir is None) != (self.cni_conf_dir is None):
            raise ValueError("--cni-bin-dir and --cni-conf-dir go together (the CNI installer)")
        if self.daemonset is not None and self.daemonset.count("/") != 1:
            raise ValueError(f"--daemonset {self.daemonset!r}: use namespace/name")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers {self.workers}: use 1 to {MAX_WORKERS} (or auto)")
        if self.handover_wait < 0 or self.drain < 0:
            raise ValueError("--handover-wait and --drain are seconds, 0 or more")


@dataclass(frozen=True)
class CaConfig:
    state_dir: Path | None
    data_dir: Path
    node_tokens: Path | None  # the lab's bootstrap tokens (none on Kubernetes: TokenReview)
    plugin_certs: Path | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    listen: tuple[str, int] = ("0.0.0.0", CA_PORT)
    metrics_listen: tuple[str, int] = ("0.0.0.0", CA_METRICS_PORT)
    ttl_seconds: int = 24 * 3600
    server_name: str = CA_SERVER_NAME
    kubeconfig: str | None = None
    agent_account: str = "veil-system/veil-agent"  # whose tokens are a node's (TokenReview)
    ca_secret: str | None = None  # namespace/name: the root and key in a Secret (Kubernetes)

    def __post_init__(self) -> None:
        check_state_source(self.state_dir, self.kubeconfig)
        for flag, value in (
            ("--agent-service-account", self.agent_account),
            ("--ca-secret", self.ca_secret),
        ):
            ns, sep, name = (value or "a/b").partition("/")
            if not (ns and sep and name):
                raise ValueError(f"{flag} {value!r}: expected namespace/name")
        if self.ca_secret is not None and self.kubeconfig is None:
            raise ValueError("--ca-secret needs --kubeconfig (the Secret is read through the API)")
        check_trust_domain(self.trust_domain)
        if self.ttl_seconds < 1:
            raise ValueError(f"--ttl must be at least 1 second, got {self.ttl_seconds}")
