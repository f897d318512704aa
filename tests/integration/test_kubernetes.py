"""The lab's kubernetes mode (issue 19): the upstream control plane (built by `make upstream`)
in the control-plane netns, and each lab node registered with it by the lab's kubelet. Real
etcd, kube-apiserver, kube-controller-manager and kube-scheduler; no stand-in anywhere."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.lab import MESH, leftovers, new_lab_name, veil
from veil.lab import kubernetes, upstream

pytestmark = pytest.mark.skipif(
    bool(upstream.missing()), reason="the upstream binaries are not built: make upstream"
)

DEPLOYMENT = """
apiVersion: v1
kind: Namespace
metadata: {name: kube-test}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: kube-test}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: veil/echo, command: [veil, echo]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: kube-test}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


def kubectl(lab: str, *args: str, user: str = "admin", stdin: str | None = None) -> Any:
    proc = subprocess.run(
        kubernetes.kubectl_argv(lab, *args, user=user),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc


def get(lab: str, *args: str) -> dict[str, Any]:
    proc = kubectl(lab, "get", *args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.fixture(scope="module")
def kube_lab() -> Iterator[str]:
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", MESH, "--name", name, "--kubernetes", timeout=300)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False, timeout=120)
    assert leftovers(name) == []


def test_every_lab_node_is_registered_and_ready(kube_lab):
    nodes = get(kube_lab, "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2"]
    for n in nodes:
        ready = next(c for c in n["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
    lease = get(kube_lab, "lease", "-n", "kube-node-lease", "node1")
    assert lease["spec"]["holderIdentity"] == "node1"


def test_rbac_and_the_node_authorizer_are_on(kube_lab):
    """A node's credential may read its own Node but not the cluster's Secrets (403)."""
    assert kubectl(kube_lab, "get", "node", "node1", user="kubelet-node1").returncode == 0
    denied = kubectl(kube_lab, "get", "secrets", "-A", user="kubelet-node1")
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
    other = kubectl(kube_lab, "label", "node", "node2", "x=y", user="kubelet-node1")
    assert other.returncode != 0 and "Forbidden" in other.stderr, other.stderr  # NodeRestriction
    assert kubectl(kube_lab, "get", "secrets", "-A").returncode == 0  # the admin may


def test_controllers_and_scheduler_place_a_deployment_over_both_nodes(kube_lab):
    applied = kubectl(kube_lab, "apply", "-f", "-", stdin=DEPLOYMENT)
    assert applied.returncode == 0, applied.stderr
    deadline = time.monotonic() + 60
    while True:  # the ReplicaSet's pods, each bound to a node by the scheduler
        pods = get(kube_lab, "pods", "-n", "kube-test")["items"]
        if len(pods) == 4 and all(p["spec"].get("nodeName") for p in pods):
            break
        assert time.monotonic() < deadline, get(kube_lab, "events", "-n", "kube-test")
        time.sleep(0.5)
    assert {p["spec"]["nodeName"] for p in pods} == {"node1", "node2"}  # spread by the scheduler
    svc = get(kube_lab, "service", "-n", "kube-test", "web")
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network("10.96.0.0/16")
    sa = get(kube_lab, "serviceaccount", "-n", "kube-test", "default")  # the SA controller's
    assert sa["metadata"]["name"] == "default"


def test_the_kubernetes_source_follows_the_api(kube_lab):
    """runtime/sources/kubernetes.py against the real API server: list, then watch; a node's
    source sees only its own pods (issue 20, item 1 in part)."""
    from veil.lab.controlplane import cp_netns  # noqa: PLC0415
    from veil.lab.netns import nsenter_argv  # noqa: PLC0415

    kubeconfig = str(kubernetes.kube_dir(kube_lab) / "admin.kubeconfig")
    argv = [sys.executable, "-m", "veil.runtime.sources.kubernetes", kubeconfig, "node1"]
    proc = subprocess.Popen(
        nsenter_argv(cp_netns(kube_lab), argv), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert (
            "kube-system" in first["namespaces"]
            and "default/kubernetes=10.96.0.1" in first["services"]
        )
        applied = kubectl(
            kube_lab, "apply", "-f", "-", stdin=DEPLOYMENT.replace("kube-test", "src-test")
        )
        assert applied.returncode == 0, applied.stderr
        deadline = time.monotonic() + 60
        while True:  # until the source holds exactly node1's pods, as the API has them
            seen = json.loads(proc.stdout.readline())
            api = get(kube_lab, "pods", "-n", "src-test")["items"]
            on_node1 = {
                f"src-test/{p['metadata']['name']}@node1"
                for p in api
                if p["spec"].get("nodeName") == "node1"
            }
            mine = {p for p in seen["pods"] if p.startswith("src-test/")}
            if (
                len(api) == 4
                and all(p["spec"].get("nodeName") for p in api)
                and on_node1
                and mine == on_node1
                and any(s.startswith("src-test/web=10.96.") for s in seen["services"])
            ):
                break
            assert time.monotonic() < deadline, (seen, on_node1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
