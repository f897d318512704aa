"""The lab's kubernetes mode: the genuine upstream control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, built by `make upstream`) in the control-plane netns,
beside the CA, with a PKI and kubeconfigs of its own.

    veil-<lab>-cp (172.30.0.2)
        etcd                     127.0.0.1:2379 (the netns's loopback only: no TLS needed)
        kube-apiserver           172.30.0.2:6443, TLS from the lab PKI, Node,RBAC
        kube-controller-manager  service-account tokens, deployments, endpointslices, GC, ...
        kube-scheduler

Everything lives in `<lab dir>/kubernetes/` (keys mode 0600) and goes with `veil lab down`.
The API server is reached from inside the lab's netns (`veil lab kubectl ...` runs kubectl
in the control-plane netns with the admin kubeconfig); nothing is opened to the host.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.core.certs import key_usage
from veil.lab import cgroups, netns, store, upstream
from veil.lab.controlplane import (
    CA_IP,
    CA_PORT,
    Daemon,
    Spawn,
    cp_netns,
    daemon_env,
    kube_dir,
    supervised,
    veil_argv,
    wait_listening,
)
from veil.lab.errors import LabError
from veil.lab.plan import SERVICE_CIDR, LabPlan

API_PORT = 6443
ETCD_PORT = 2379
API_SERVICE_IP = SERVICE_CIDR.network_address + 1  # the `kubernetes` Service
ISSUER = "https://kubernetes.default.svc.cluster.local"
LIFETIME = datetime.timedelta(days=30)
Key = ec.EllipticCurvePrivateKey


def server_url() -> str:
    return f"https://{CA_IP}:{API_PORT}"


# -- PKI -------------------------------------------------------------------------------------


def _name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(cn: str = "veil-lab-kubernetes-ca") -> tuple[Key, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(ca=True),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(  # noqa: PLR0917
    ca: tuple[Key, x509.Certificate],
    cn: str,
    orgs: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    server: bool = False,
) -> tuple[Key, x509.Certificate]:
    """A leaf of the lab's Kubernetes CA: a client certificate (user `cn`, groups `orgs`),
    or a serving one for the names and addresses given."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, orgs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if dns or ips:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def kubeconfig(user: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> str:
    """A kubeconfig for one user of the lab's API server, credentials inline."""
    import base64  # noqa: PLC0415

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "veil-lab",
                "cluster": {"server": server_url(), "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
            }
        ],
        "contexts": [{"name": "veil-lab", "context": {"cluster": "veil-lab", "user": user}}],
        "current-context": "veil-lab",
    }
    return yaml.safe_dump(doc, sort_keys=False)


# Users of the control plane: file name -> (user, groups)
USERS = {
    "admin": ("kubernetes-admin", ("system:masters",)),
    "controller-manager": ("system:kube-controller-manager", ()),
    "scheduler": ("system:kube-scheduler", ()),
    # The lab kubelet's kube-proxy part (bound to system:node-proxier by default).
    "kube-proxy": ("system:kube-proxy", ()),
}


STATE_READERS = "veil:state-readers"  # Veil's daemons in the lab: what they watch, read-only
USERS["veil-ca"] = ("veil:ca", (STATE_READERS,))
USERS["veil-controller"] = ("veil:controller", (STATE_READERS,))

# Until the chart's per-component RBAC (issue 20, item 6): the lab's Veil daemons may read
# the kinds the state source watches, and nothing else (no Secrets); the CA may review
# tokens; the controller may manage what waypoints are made of, and Gateways' status.
VEIL_NAMESPACE = "veil-system"
NAMESPACE = f"{{apiVersion: v1, kind: Namespace, metadata: {{name: {VEIL_NAMESPACE}}}}}"
STATE_READER_RBAC = f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: veil-ca, namespace: {VEIL_NAMESPACE}}}
rules:
- apiGroups: [""]
  resources: [secrets, configmaps]
  verbs: [get, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: veil-ca, namespace: {VEIL_NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: veil-ca}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "veil:ca"}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: veil-state-reader}}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [veil-mesh]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gateways, httproutes, grpcroutes, tcproutes, referencegrants]
  verbs: [get, list, watch]
- apiGroups: [security.veil.dev]
  resources: [authorizationpolicies, requestauthentications]
  verbs: [get, list, watch]
- apiGroups: [traffic.veil.dev]
  resources: [trafficpolicies]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: veil-state-reader}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: veil-state-reader}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "{STATE_READERS}"}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: veil-ca-token-review}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:auth-delegator}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "veil:ca"}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: veil-controller}}
rules:
- apiGroups: [gateway.networking.k8s.io]
  resources: [gateways/status, httproutes/status, grpcroutes/status, tcproutes/status]
  verbs: [get, patch, update]
- apiGroups: [security.veil.dev]
  resources: [authorizationpolicies/status, requestauthentications/status]
  verbs: [get, patch, update]
- apiGroups: [traffic.veil.dev]
  resources: [trafficpolicies/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [serviceaccounts, services, configmaps]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [clusterrolebindings]
  resourceNames: [veil-waypoints]
  verbs: [get, patch, update]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [clusterrolebindings]
  verbs: [create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [clusterroles]
  resourceNames: [veil-state-reader]
  verbs: [bind]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: veil-controller}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: veil-controller}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "veil:controller"}}
"""


def write_pki(plan: LabPlan) -> None:
    """The CA, the API server's serving certificate, the service-account signing key, and a
    kubeconfig per user: admin, the controllers, the scheduler, each node's kubelet."""
    d = kube_dir(plan.name)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = new_ca()
    ca_pem = _pem_cert(ca[1])
    store.atomic_write(d / "ca.pem", ca_pem.decode())
    store.atomic_write(d / "ca.key", _pem_key(ca[0]).decode(), mode=0o600)
    key, cert = issue(
        ca,
        "kube-apiserver",
        dns=[
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "localhost",
        ],
        ips=[str(CA_IP), str(API_SERVICE_IP), "127.0.0.1"],
        server=True,
    )
    store.atomic_write(d / "apiserver.pem", _pem_cert(cert).decode())
    store.atomic_write(d / "apiserver.key", _pem_key(key).decode(), mode=0o600)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    store.atomic_write(d / "sa.key", _pem_key(sa).decode(), mode=0o600)
    sa_pub = sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    store.atomic_write(d / "sa.pub", sa_pub.decode())
    users = dict(USERS)
    for n in plan.nodes:
        users[f"kubelet-{n.name}"] = (f"system:node:{n.name}", ("system:nodes",))
        users[f"agent-{n.name}"] = (f"veil:agent:{n.name}", (STATE_READERS,))
    for name, (user, groups) in users.items():
        key, cert = issue(ca, user, groups)
        store.atomic_write(
            d / f"{name}.kubeconfig",
            kubeconfig(user, ca_pem, _pem_cert(cert), _pem_key(key)),
            mode=0o600,
        )


# -- the control plane's processes -----------------------------------------------------------


def argvs(lab: str) -> dict[str, list[str]]:
    """Each control-plane process's command line."""
    b, d = upstream.bin_dir(), kube_dir(lab)

    def auth(kc: str) -> list[str]:  # what the controllers and the scheduler share
        return [
            f"--kubeconfig={d / kc}",
            f"--authentication-kubeconfig={d / kc}",
            f"--authorization-kubeconfig={d / kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]

    return {
        "etcd": [
            str(b / "etcd"),
            "--name=lab",
            f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
            f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=lab=http://127.0.0.1:2380",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
            f"--advertise-address={CA_IP}",
            f"--bind-address={CA_IP}",
            f"--secure-port={API_PORT}",
            f"--tls-cert-file={d / 'apiserver.pem'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.pem'}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-account-issuer={ISSUER}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            str(b / "kube-controller-manager"),
            *auth("controller-manager.kubeconfig"),
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.pem'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        ],
        "kube-scheduler": [
            str(b / "kube-scheduler"),
            *auth("scheduler.kubeconfig"),
            "--profiling=false",
        ],
    }


PORTS = {
    "etcd": ETCD_PORT,
    "kube-apiserver": API_PORT,
    "kube-controller-manager": 10257,
    "kube-scheduler": 10259,
}


def start(plan: LabPlan, spawn: Spawn, timeout: float) -> list[Daemon]:
    """etcd, then the API server (ready), then the controllers and the scheduler, each under
    the lab's supervisor in the control-plane netns."""
    if missing := upstream.missing():
        raise LabError(
            f"--kubernetes needs the upstream binaries ({', '.join(missing)} missing in "
            f"{upstream.bin_dir()}): run `make upstream`"
        )
    lab = plan.name
    write_pki(plan)
    commands = argvs(lab)
    daemons: list[Daemon] = []
    for group in (("etcd",), ("kube-apiserver",), ("kube-controller-manager", "kube-scheduler")):
        started = []
        for name in group:
            cg = cgroups.create(cgroups.lab_group(lab) / "control-plane" / name)
            log = store.lab_dir(lab) / "logs" / f"{name}.log"
            argv, state = supervised(lab, name, commands[name])
            proc = spawn(cp_netns(lab), argv, daemon_env(), cg, log)
            started.append(Daemon(name, cp_netns(lab), proc, PORTS[name], log, state))
        daemons += started
        wait_listening(started, timeout)
        if "kube-apiserver" in group:
            wait_ready(lab, timeout)
    return daemons


def kubectl_argv(lab: str, *args: str, user: str = "admin") -> list[str]:
    """kubectl as `user` (admin, or kubelet-<node>), run inside the control-plane netns."""
    kc = kube_dir(lab) / f"{user}.kubeconfig"
    return netns.nsenter_argv(
        cp_netns(lab), [str(upstream.bin_dir() / "kubectl"), f"--kubeconfig={kc}", *args]
    )


def wait_ready(lab: str, timeout: float) -> None:
    """Until the API server's /readyz says ok (etcd reachable, bootstrap done)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = netns.run(kubectl_argv(lab, "get", "--raw", "/readyz"), check=False, timeout=10)
        if proc.returncode == 0 and proc.stdout.strip() == "ok":
            return
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        last = lines[-1] if lines else ""
        if time.monotonic() > deadline:
            raise LabError(f"kube-apiserver not ready after {timeout:.0f}s: {last}")
        time.sleep(0.2)


def start_kubelets(
    plan: LabPlan, spawn: Spawn, node_netns: Callable[[str, str], str]
) -> list[Daemon]:
    """The lab's kubelet of each node (`veil.lab.kubelet`), in the node's netns."""
    lab = plan.name
    out = []
    for n in plan.nodes:
        cg = cgroups.create(cgroups.lab_group(lab) / "nodes" / n.name / "kubelet")
        log = store.lab_dir(lab) / "logs" / f"kubelet-{n.name}.log"
        argv, state = supervised(
            lab,
            f"kubelet {n.name}",
            [
                sys.executable,
                "-m",
                "veil.lab.kubelet",
                lab,
                n.name,
                str(n.index),
                str(n.mask),
            ],
        )
        ns = node_netns(lab, n.name)
        out.append(
            Daemon(f"kubelet {n.name}", ns, spawn(ns, argv, daemon_env(), cg, log), 0, log, state)
        )
    return out


def node_conditions(lab: str) -> dict[str, str]:
    """Each registered Node's Ready status ("True", "False", "Unknown")."""
    proc = netns.run(kubectl_argv(lab, "get", "nodes", "-o", "json"), check=False, timeout=15)
    if proc.returncode != 0:
        return {}
    out = {}
    for item in json.loads(proc.stdout).get("items", []):
        ready = [c for c in item["status"].get("conditions", []) if c["type"] == "Ready"]
        out[item["metadata"]["name"]] = ready[0]["status"] if ready else "Unknown"
    return out


def wait_nodes_ready(plan: LabPlan, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    want = {n.name for n in plan.nodes}
    while True:
        seen = node_conditions(plan.name)
        if all(seen.get(n) == "True" for n in want):
            return
        if time.monotonic() > deadline:
            raise LabError(f"nodes not Ready in the API after {timeout:.0f}s: {seen or 'none'}")
        time.sleep(0.2)


def start_controller(plan: LabPlan, spawn: Spawn) -> Daemon:
    """`veil controller` in the control-plane netns: Gateways of class veil-waypoint become
    waypoint Deployments that the kubelets run, with the CA's roots and address."""
    lab = plan.name
    cg = cgroups.create(cgroups.lab_group(lab) / "control-plane" / "controller")
    log = store.lab_dir(lab) / "logs" / "controller.log"
    argv, state = supervised(
        lab,
        "controller",
        veil_argv(
            "controller",
            "--kubeconfig", str(kube_dir(lab) / "veil-controller.kubeconfig"),
            "--ca-address", f"{CA_IP}:{CA_PORT}",
            "--trust-configmap", f"{VEIL_NAMESPACE}/veil-ca-root",
        ),
    )  # fmt: skip
    proc = spawn(cp_netns(lab), argv, daemon_env(), cg, log)
    return Daemon("controller", cp_netns(lab), proc, 0, log, state)


CHART = upstream.ROOT / "deploy" / "chart" / "veil"


def helm_install(
    lab: str,
    capture: Mapping[str, str],
    timeout: float,
    workers: Mapping[str, int] | None = None,
) -> None:
    """`helm install veil deploy/chart/veil` as the admin, into veil-system; the image names
    Veil, which the lab's kubelets run from the venv (lab/pods.py)."""
    modes = set(capture.values())
    if len(modes) > 1:
        raise LabError("--chart: one capture mode for every node (the DaemonSet has one spec)")
    counts = set((workers or {}).values()) or {1}
    argv = netns.nsenter_argv(
        cp_netns(lab),
        [
            str(upstream.bin_dir() / "helm"),
            "install", "veil", str(CHART),
            "--namespace", VEIL_NAMESPACE,
            "--kubeconfig", str(kube_dir(lab) / "admin.kubeconfig"),
            "--set", f"agent.capture={modes.pop() if modes else 'iptables'}",
            "--set", f"agent.workers={max(counts)}",
        ],
    )  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise LabError(f"helm install: {(proc.stderr or proc.stdout).strip()}")


def kubectl(lab: str, *args: str, stdin: str | None = None, timeout: float = 60) -> str:
    """kubectl as the admin; its output, or a LabError with kubectl's own message."""
    proc = subprocess.run(
        kubectl_argv(lab, *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"kubectl {' '.join(args[:2])}: {proc.stderr.strip()}")
    return proc.stdout


VEIL_CRDS = upstream.ROOT / "deploy" / "chart" / "veil" / "crds"


def crd_name(path: Path) -> str:
    """`gateway.networking.k8s.io_httproutes.yaml` -> `httproutes.gateway.networking.k8s.io`"""
    group, _, plural = path.name.removesuffix(".yaml").partition("_")
    return f"{plural}.{group}"


def install(lab: str, timeout: float, rbac: bool = True) -> None:
    """What a cluster has before Veil's workloads: Gateway API's CRDs (from the pinned
    release's Go module), Veil's CRDs (the chart's, deploy/chart/veil/crds/), and RBAC for the
    lab's Veil daemons."""
    gateway = sorted(upstream.gateway_crds().glob("*.yaml"))
    crds = [p for p in [*gateway, *sorted(VEIL_CRDS.glob("*.yaml"))] if "_vap_" not in p.name]
    args = [a for p in [*gateway, *crds] for a in ("-f", str(p))]
    kubectl(lab, "apply", "--server-side", "--force-conflicts", *args, timeout=timeout)
    kubectl(lab, "apply", "--server-side", "-f", "-", stdin=NAMESPACE)
    if rbac:  # the lab's own daemons' (with the chart, the chart's own)
        kubectl(lab, "apply", "--server-side", "-f", "-", stdin=STATE_READER_RBAC)
    kubectl(
        lab, "wait", "--for=condition=Established", "--timeout", f"{timeout:.0f}s",
        *(f"crd/{crd_name(p)}" for p in crds), timeout=timeout + 10,
    )  # fmt: skip


def apply_manifests(lab: str, paths: Sequence[str | Path]) -> None:
    """`kubectl apply --server-side` of the user's manifests, as given to `lab up`."""
    args = [a for p in paths for a in ("-f", str(p))]
    deadline = time.monotonic() + 60
    while True:
        try:
            kubectl(lab, "apply", "--server-side", *args, timeout=120)
            return
        except LabError as e:
            # A pod applied with its namespace waits for the namespace's `default` service
            # account (the controller makes it a moment later); nothing else is retried.
            if "serviceaccount" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def workloads_ready(lab: str) -> tuple[bool, str]:
    """Every Deployment has its ready replicas, and every pod outside kube-system is Ready."""
    deployments = json.loads(kubectl(lab, "get", "deployments", "-A", "-o", "json"))["items"]
    pods = json.loads(kubectl(lab, "get", "pods", "-A", "-o", "json"))["items"]
    waiting = [
        f"deployment {d['metadata']['namespace']}/{d['metadata']['name']}"
        for d in deployments
        if (d.get("status", {}).get("readyReplicas") or 0) < d["spec"].get("replicas", 1)
    ]
    for p in pods:
        conds = {c["type"]: c["status"] for c in p.get("status", {}).get("conditions", [])}
        if conds.get("Ready") != "True" and p["metadata"]["namespace"] != "kube-system":
            name = f"pod {p['metadata']['namespace']}/{p['metadata']['name']}"
            states = p.get("status", {}).get("containerStatuses") or []
            why = next(
                (s["state"]["waiting"].get("message") for s in states if "waiting" in s["state"]),
                None,
            )
            waiting.append(f"{name} ({why})" if why else name)
    return not waiting, ", ".join(waiting[:5])


def wait_workloads(lab: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ok, waiting = workloads_ready(lab)
        if ok:
            return
        if time.monotonic() > deadline:
            raise LabError(f"workloads not ready after {timeout:.0f}s: {waiting}")
        time.sleep(0.5)
