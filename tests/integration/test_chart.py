"""The Helm chart (issue 21): `helm lint` and `helm template` clean with both capture modes,
every object it renders accepted by the real API server (server-side apply, dry run), CRDs
installed first as Helm would; then its whole life on the kubernetes-mode lab: install, the
startup taint, veil-cni on the nodes, an agent crash loop, `helm upgrade` under traffic,
`helm uninstall` and installing again over running pods."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.lab import (
    MESH,
    VEIL,
    curl_json,
    enrolled,
    leftovers,
    metric,
    new_lab_name,
    veil,
)
from tests.support.traffic import TRAFFIC
from veil.lab import controlplane, kubernetes, netns, store, upstream
from veil.lab import lab as labmod
from veil.lab.sniff import Sniffer

pytestmark = pytest.mark.skipif(
    bool(upstream.missing()), reason="the upstream binaries are not built: make upstream"
)
CHART = Path(__file__).resolve().parents[2] / "deploy" / "chart" / "veil"
HELM = str(upstream.bin_dir() / "helm")


def helm(*args: str) -> str:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def render(*sets: str) -> list[dict[str, Any]]:
    out = helm("template", "veil", str(CHART), "--namespace", "veil-system", *sets)
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("capture", ["iptables", "ebpf"])
def test_the_chart_lints_and_renders(capture):
    helm("lint", "--strict", str(CHART), "--set", f"agent.capture={capture}")
    objects = render("--set", f"agent.capture={capture}")
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    agent = next(o for o in objects if o["kind"] == "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"]
    caps = set(security["capabilities"]["add"])
    assert ("BPF" in caps) is (capture == "ebpf")
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert agent["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    ca = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "veil-ca"
    )
    assert ca["spec"]["replicas"] == 2
    assert (
        "--ca-secret=veil-system/veil-ca" in ca["spec"]["template"]["spec"]["containers"][0]["args"]
    )


@pytest.mark.parametrize("capture", ["iptables", "ebpf"])
def test_every_rendered_object_is_accepted_by_the_api_server(kube_lab, capture):
    kubernetes.kubectl(
        kube_lab, "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds")
    )
    out = helm("template", "veil", str(CHART), "--namespace", "veil-system",
               "--set", f"agent.capture={capture}")  # fmt: skip
    applied = kubernetes.kubectl(
        kube_lab, "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=out
    )
    assert applied.count("(server dry run)") == len(render("--set", f"agent.capture={capture}"))


@pytest.fixture(scope="module")
def chart_lab() -> Iterator[str]:
    """Veil installed with its chart on the kubernetes-mode lab: the kubelets run the agent
    DaemonSet, the CA Deployment and the controller, as on a cluster."""
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", MESH, "--name", name, "--kubernetes", "--chart", timeout=400)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False, timeout=120)
    assert leftovers(name) == []


def test_the_chart_installs_and_the_kubelets_run_veil(chart_lab):
    get = lambda *a: json.loads(kubernetes.kubectl(chart_lab, "get", *a, "-o", "json"))  # noqa: E731
    ds = get("daemonset", "-n", "veil-system", "veil-agent")
    assert ds["status"]["numberReady"] == 2, ds["status"]
    for name, replicas in (("veil-ca", 2), ("veil-controller", 1)):
        dep = get("deployment", "-n", "veil-system", name)
        assert dep["status"].get("readyReplicas") == replicas, dep["status"]
    agents = get("pods", "-n", "veil-system", "-l", "app.kubernetes.io/name=veil-agent")["items"]
    assert sorted(p["spec"]["nodeName"] for p in agents) == ["node1", "node2"]
    assert {p["status"]["podIP"] for p in agents} == {"172.30.0.11", "172.30.0.12"}  # hostNetwork


def test_mesh_traffic_through_the_charts_agents(chart_lab):
    """mesh/client (node1) to mesh/server-b (node2): captured at creation by the DaemonSet's
    agent (veil-cni to its socket), carried in mTLS with identities from the chart's CA."""
    ip = json.loads(
        kubernetes.kubectl(chart_lab, "get", "pod", "-n", "mesh", "server-b", "-o", "json")
    )["status"]["podIP"]
    out = curl_json(chart_lab, "client", f"http://{ip}:8080/", ns="mesh")
    assert out["pod"] == "server-b"
    assert (
        metric(chart_lab, "node1", "istio_tcp_connections_opened_total",
               connection_security_policy="mutual_tls", source_workload="client")
        >= 1
    )  # fmt: skip
    assert enrolled(chart_lab, "node1") == {"mesh/client", "mesh/server-a"}


# -- the lifecycle on a node: CNI, taint, upgrade, uninstall (issue 21, items 3-7) ------------


def kget(lab: str, *args: str) -> Any:
    return json.loads(kubernetes.kubectl(lab, "get", *args, "-o", "json"))


def conflist(lab: str, node: str) -> tuple[Path, dict[str, Any]]:
    d = labmod.node_host(lab, node) / "etc/cni/net.d"
    (path,) = sorted(d.glob("*.conflist"))
    return path, json.loads(path.read_text())


def wait_until(what: str, predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.2)


def helm_in_lab(lab: str, *args: str) -> str:
    argv = netns.nsenter_argv(
        controlplane.cp_netns(lab),
        [HELM, *args, "--namespace", "veil-system",
         "--kubeconfig", str(controlplane.kube_dir(lab) / "admin.kubeconfig")],
    )  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def new_pod(lab: str, name: str, node: str) -> None:
    """A mesh pod pinned to `node` (as a DaemonSet-free test pod would be)."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "mesh"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": "ghcr.io/veil-dev/veil:0.1", "args": ["echo"]}],
        },
    }
    kubernetes.kubectl(lab, "apply", "-f", "-", stdin=json.dumps(manifest))


def running(lab: str, name: str) -> bool:
    return bool(kget(lab, "pod", "-n", "mesh", name)["status"].get("phase") == "Running")


def test_nodes_are_registered_not_ready_for_veil_until_their_agent_is(chart_lab):
    """The startup taint (as kubelet --register-with-taints): the agent removed it once it
    could capture, and nothing else of the node's."""
    log = (store.lab_dir(chart_lab) / "logs" / "kubelet-node1.log").read_text()
    nodes = kget(chart_lab, "nodes")["items"]
    assert [n["spec"].get("taints") for n in nodes] == [None, None]
    agents = sorted((store.lab_dir(chart_lab) / "logs").glob("veil-system_veil-agent-*"))
    assert any("taint veil.dev/not-ready removed" in p.read_text() for p in agents), log[-500:]


def test_veil_cni_is_installed_chained_and_survives_a_rewrite_by_the_primary(chart_lab):
    for node in ("node1", "node2"):
        path, doc = conflist(chart_lab, node)
        assert [p["type"] for p in doc["plugins"]] == ["ptp", "veil-cni"]
        assert doc["plugins"][1]["excludeNamespaces"] == ["veil-system", "kube-system"]
        shim = labmod.node_host(chart_lab, node) / "opt/cni/bin/veil-cni"
        assert shim.read_bytes().startswith(b"\x7fELF")  # the static C shim, not a script
    # The primary CNI writes its file again (its own upgrade): Veil is back within a second.
    path, doc = conflist(chart_lab, "node1")
    store.atomic_write(path, json.dumps({**doc, "plugins": doc["plugins"][:1]}))
    wait_until(
        "veil-cni chained again", lambda: len(conflist(chart_lab, "node1")[1]["plugins"]) == 2, 5
    )
    new_pod(chart_lab, "after-rewrite", "node1")
    wait_until("the new pod runs", lambda: running(chart_lab, "after-rewrite"))
    assert "mesh/after-rewrite" in enrolled(chart_lab, "node1")
    kubernetes.kubectl(chart_lab, "delete", "pod", "-n", "mesh", "after-rewrite", "--wait=false")


def test_a_pod_created_while_the_agent_is_down_never_starts_uncaptured(chart_lab):
    """The agent on node1 is killed again and again for a while (as a crash loop would): the
    pod created meanwhile fails CNI ADD (the shim cannot reach the agent: try again) and is
    retried by the kubelet; it runs only once the agent is back, and captured."""
    stop = threading.Event()
    killed: list[int] = []

    def crash_loop() -> None:
        while not stop.is_set():
            for p in labmod.kubelet_pods(chart_lab, host_network=True):
                if p["name"].startswith("veil-agent-") and p.get("node") == "node1":
                    for pid in p.get("pids", []):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, 9)
                            killed.append(pid)
            time.sleep(0.1)

    t = threading.Thread(target=crash_loop, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        new_pod(chart_lab, "while-down", "node1")
        time.sleep(4)
        assert killed and not running(chart_lab, "while-down")
    finally:
        stop.set()
        t.join()
    wait_until("the pod runs once the agent is back", lambda: running(chart_lab, "while-down"), 90)
    assert "mesh/while-down" in enrolled(chart_lab, "node1")
    log = (store.lab_dir(chart_lab) / "logs" / "kubelet-node1.log").read_text()
    assert "veil agent unreachable" in log
    kubernetes.kubectl(chart_lab, "delete", "pod", "-n", "mesh", "while-down", "--wait=false")


def test_helm_upgrade_replaces_every_agent_resetting_and_refusing_nothing(chart_lab):
    """`helm upgrade` to another image tag: the DaemonSet's maxSurge pods take the listeners
    over on each node while traffic runs (long-lived connections that end within the drain
    period, and new ones all along): 0 reset, 0 refused, nothing in plaintext."""
    before = {p["metadata"]["name"] for p in agent_pods(chart_lab)}
    ip = kget(chart_lab, "pod", "-n", "mesh", "server-b")["status"]["podIP"]
    marker = f"upgrade-{secrets.token_hex(6)}"
    sniffer = Sniffer(f"/run/netns/veil-{chart_lab}-underlay")

    def run() -> dict[str, Any]:
        app = subprocess.Popen(
            [*exec_client(chart_lab), "python3", "-c", TRAFFIC, ip, "25", marker],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert app.stdout is not None and app.stdout.readline().strip() == "started"
            time.sleep(2)
            helm_in_lab(chart_lab, "upgrade", "veil", str(CHART), "--reuse-values",
                        "--set", "image.tag=0.2.0-upgrade")  # fmt: skip
            kubernetes.kubectl(
                chart_lab, "rollout", "status", "daemonset/veil-agent", "-n", "veil-system",
                "--timeout=120s", timeout=130,
            )  # fmt: skip
            out, _ = app.communicate(timeout=90)
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
        result: dict[str, Any] = json.loads(out)
        return result

    result = sniffer.during(run)
    assert [c["error"] for c in result["long"]] == [None] * 4, result
    assert result["new_errors"] == [] and result["new_ok"] > 50, result
    assert sniffer.plaintext(marker.encode()) == []
    after = agent_pods(chart_lab)
    assert len(after) == 2 and not before & {p["metadata"]["name"] for p in after}
    assert all(p["spec"]["containers"][0]["image"].endswith(":0.2.0-upgrade") for p in after)
    assert enrolled(chart_lab, "node1") >= {"mesh/client", "mesh/server-a"}


def agent_pods(lab: str) -> list[dict[str, Any]]:
    items = kget(lab, "pods", "-n", "veil-system", "-l", "app.kubernetes.io/name=veil-agent")
    return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]


def exec_client(lab: str) -> list[str]:
    return [VEIL, "lab", "exec", "--name", lab, "-n", "mesh", "client", "--"]


def test_helm_uninstall_leaves_every_pod_working_unmeshed_then_install_finds_them(chart_lab):
    """`helm uninstall`: each agent sees its DaemonSet deleted, releases its pods (rules
    removed) and takes veil-cni off the node; the pods then talk in plain TCP and new pods
    start. A new `helm install` finds the running pods on the hosts and captures them again."""
    helm_in_lab(chart_lab, "uninstall", "veil", "--wait", "--timeout", "120s")
    wait_until("the agents gone", lambda: not agent_pods(chart_lab) and not kget(
        chart_lab, "pods", "-n", "veil-system")["items"], 120)  # fmt: skip
    for node in ("node1", "node2"):
        assert [p["type"] for p in conflist(chart_lab, node)[1]["plugins"]] == ["ptp"]
        assert not (labmod.node_host(chart_lab, node) / "opt/cni/bin/veil-cni").exists()
    ip = kget(chart_lab, "pod", "-n", "mesh", "server-b")["status"]["podIP"]
    marker = f"unmeshed-{secrets.token_hex(6)}"
    sniffer = Sniffer(f"/run/netns/veil-{chart_lab}-underlay")
    out = sniffer.during(
        lambda: curl_json(chart_lab, "client", f"http://{ip}:8080/?{marker}", ns="mesh")
    )
    assert out["pod"] == "server-b"
    assert sniffer.plaintext(marker.encode()) != []  # no mesh any more: plain TCP, as asked
    new_pod(chart_lab, "after-uninstall", "node1")
    wait_until("a pod starts without Veil", lambda: running(chart_lab, "after-uninstall"))
    # Install again: the pods already running (no CNI ADD for them) are found and captured.
    kubernetes.helm_install(chart_lab, {"node1": "iptables", "node2": "iptables"}, 120)
    kubernetes.wait_workloads(chart_lab, 120)
    want = {"mesh/client", "mesh/server-a", "mesh/after-uninstall"}
    wait_until("running pods enrolled", lambda: enrolled(chart_lab, "node1") >= want, 60)
    assert curl_json(chart_lab, "client", f"http://{ip}:8080/", ns="mesh")["pod"] == "server-b"
    kubernetes.kubectl(chart_lab, "delete", "pod", "-n", "mesh", "after-uninstall", "--wait=false")
