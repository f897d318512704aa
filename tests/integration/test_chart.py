"""The Helm chart (issue 21, item 1 in part): `helm lint` and `helm template` clean with
both capture modes, and every object it renders accepted by the real API server
(server-side apply, dry run), CRDs installed first as Helm would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.lab import MESH, curl_json, enrolled, leftovers, metric, new_lab_name, veil
from veil.lab import kubernetes, upstream

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
