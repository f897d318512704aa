"""The lab's kubernetes mode (issue 19): the upstream control plane (built by `make upstream`)
in the control-plane netns, each lab node registered with it and running its pods as the
lab's kubelet, and Veil's CA and agents reading the API. Real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler; no stand-in anywhere. The lab's manifests
(tests/integration/mesh) are applied with kubectl, so the API server validates them."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import (
    curl_json,
    enrolled,
    lab_exec,
    metric,
    veil,
)
from veil.lab import controlplane, kubernetes, netns, store, upstream

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
      containers:
      - {name: web, image: veil/echo, command: [veil, echo], ports: [{containerPort: 8080}]}
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


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.3)
    return got


def running(lab: str, namespace: str, count: int) -> list[dict[str, Any]] | None:
    """The namespace's pods once there are `count`, each Running, Ready and with an IP."""
    pods = get(lab, "pods", "-n", namespace)["items"]
    ok = len(pods) == count and all(
        p["status"].get("phase") == "Running"
        and p["status"].get("podIP")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
        for p in pods
    )
    return pods if ok else None


def node_cidr(node: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.244.{node.removeprefix('node')}.0/24")


def test_a_deployment_runs_on_both_nodes_and_its_service_reaches_every_pod(kube_lab):
    """The scheduler spreads the ReplicaSet's pods; each node's kubelet runs its own in a
    netns from the CNI chain and reports them Running with their IP; the Service's ClusterIP
    (allocated by the API server) reaches pods on both nodes through the kubelets' NAT."""
    applied = kubectl(kube_lab, "apply", "-f", "-", stdin=DEPLOYMENT)
    assert applied.returncode == 0, applied.stderr
    pods = wait_for(lambda: running(kube_lab, "kube-test", 4), 90, "4 pods Running")
    assert {p["spec"]["nodeName"] for p in pods} == {"node1", "node2"}  # spread by the scheduler
    for p in pods:
        assert ipaddress.ip_address(p["status"]["podIP"]) in node_cidr(p["spec"]["nodeName"])
        assert f"veil-{kube_lab}-kube-test_{p['metadata']['name']}" in netns.listing()
    svc = get(kube_lab, "service", "-n", "kube-test", "web")
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network("10.96.0.0/16")
    seen: set[str] = set()
    for _ in range(30):  # plain/legacy on node2, through web.kube-test's ClusterIP
        seen.add(curl_json(kube_lab, "legacy", "http://web.kube-test/", ns="plain")["node"])
        if seen == {"node1", "node2"}:
            break
    assert seen == {"node1", "node2"}


def test_scaling_down_removes_pods_and_their_network_namespaces(kube_lab):
    kubectl(kube_lab, "apply", "-f", "-", stdin=DEPLOYMENT.replace("kube-test", "scale-test"))
    before = wait_for(lambda: running(kube_lab, "scale-test", 4), 90, "4 pods Running")
    assert (
        kubectl(kube_lab, "scale", "-n", "scale-test", "deploy/web", "--replicas=1").returncode == 0
    )
    after = wait_for(lambda: running(kube_lab, "scale-test", 1), 60, "scaled to 1")
    gone = {p["metadata"]["name"] for p in before} - {after[0]["metadata"]["name"]}
    assert len(gone) == 3
    wait_for(
        lambda: not any(f"veil-{kube_lab}-scale-test_{n}" in netns.listing() for n in gone),
        30,
        "the removed pods' netns gone",
    )


GRACE = """
apiVersion: v1
kind: Namespace
metadata: {name: grace-test}
---
apiVersion: v1
kind: Pod
metadata: {name: stubborn, namespace: grace-test}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - {name: app, image: busybox, command: [sh, -c, "trap '' TERM; while true; do sleep 0.2; done"]}
"""


def test_deletion_waits_the_grace_period_then_kills(kube_lab):
    """A container that ignores SIGTERM is killed when its grace period ends; then the pod's
    network is removed and the kubelet deletes the pod for good."""
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=GRACE).returncode == 0
    wait_for(lambda: running(kube_lab, "grace-test", 1), 60, "the pod Running")
    start = time.monotonic()
    deleted = kubectl(kube_lab, "delete", "pod", "-n", "grace-test", "stubborn", "--wait=true")
    took = time.monotonic() - start
    assert deleted.returncode == 0, deleted.stderr
    assert 2.5 <= took < 30, took
    assert f"veil-{kube_lab}-grace-test_stubborn" not in netns.listing()


VOLUMES = """
apiVersion: v1
kind: Namespace
metadata: {name: vol-test}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: vol-test}
data: {mode: fast, greeting: hello}
---
apiVersion: v1
kind: Pod
metadata: {name: reader, namespace: vol-test}
spec:
  containers:
  - name: app
    image: busybox
    command: [sleep, infinity]
    env:
    - {name: MY_NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: settings, key: greeting}}}
    volumeMounts:
    - {name: config, mountPath: /etc/veil-lab-test, readOnly: true}
  volumes:
  - {name: config, configMap: {name: settings}}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: vol-test}
spec:
  hostNetwork: true
  nodeName: node2
  containers: [{name: app, image: busybox, command: [sleep, infinity]}]
"""


def test_a_pod_reads_its_token_config_map_and_environment(kube_lab):
    """The projected service-account token (TokenRequest, bound to the pod) and the root CA at
    the standard path, a ConfigMap volume, env from fieldRef and configMapKeyRef; the token is
    one the API server accepts (TokenReview) for the pod's service account."""
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=VOLUMES).returncode == 0
    wait_for(lambda: running(kube_lab, "vol-test", 2), 60, "the pods Running")
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"

    def sh(pod: str, script: str) -> str:
        return lab_exec(kube_lab, pod, "sh", "-c", script, ns="vol-test").stdout

    assert sh("reader", f"cat {sa}/namespace") == "vol-test"
    assert "BEGIN CERTIFICATE" in sh("reader", f"cat {sa}/ca.crt")
    assert sh("reader", "cat /etc/veil-lab-test/mode") == "fast"
    assert (
        sh("reader", "touch /etc/veil-lab-test/x 2>&1 || echo read-only")
        .strip()
        .endswith("read-only")
    )
    env = sh("reader", "echo $MY_NODE $MY_IP $GREETING").split()
    pod = get(kube_lab, "pod", "-n", "vol-test", "reader")
    assert env == [pod["spec"]["nodeName"], pod["status"]["podIP"], "hello"]
    token = sh("reader", f"cat {sa}/token")
    review = kubectl(
        kube_lab,
        "create",
        "-o",
        "json",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            }
        ),
    )
    assert review.returncode == 0, review.stderr
    status = json.loads(review.stdout)["status"]
    assert status["authenticated"] is True
    assert status["user"]["username"] == "system:serviceaccount:vol-test:default"
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["reader"]
    assert not Path(sa).exists() or not any(Path(sa).iterdir())  # the host sees no volume


def test_a_host_network_pod_runs_in_the_node_netns(kube_lab):
    wait_for(lambda: running(kube_lab, "vol-test", 2), 60, "the pods Running")
    pod = get(kube_lab, "pod", "-n", "vol-test", "host")
    assert pod["status"]["podIP"] == "172.30.0.12"  # node2's address
    out = lab_exec(kube_lab, "host", "ip", "-o", "-4", "addr", ns="vol-test").stdout
    assert "172.30.0.12/24" in out


def test_the_mesh_runs_on_the_api(kube_lab):
    """tests/integration/mesh applied with kubectl: `mesh` pods are captured at creation
    (veil-cni asks the agent, which reads the API), their traffic crosses nodes in mTLS; a
    namespace labelled later with kubectl is enrolled by the agent, which finds the running
    pod by its cgroup."""
    ip = get(kube_lab, "pod", "-n", "mesh", "server-b")["status"]["podIP"]
    out = curl_json(kube_lab, "client", f"http://{ip}:8080/", ns="mesh")  # node1 -> node2
    assert out["pod"] == "server-b"
    assert (
        metric(kube_lab, "node1", "istio_tcp_connections_opened_total",
               connection_security_policy="mutual_tls", source_workload="client")
        >= 1
    )  # fmt: skip
    assert "plain/web" not in enrolled(kube_lab, "node1")
    label = kubectl(kube_lab, "label", "namespace", "plain", "veil.dev/dataplane-mode=ambient")
    assert label.returncode == 0, label.stderr
    try:
        wait_for(lambda: "plain/web" in enrolled(kube_lab, "node1"), 15, "plain/web enrolled")
        assert curl_json(kube_lab, "client", "http://web.plain/", ns="mesh")["pod"] == "web"
    finally:
        kubectl(kube_lab, "label", "namespace", "plain", "veil.dev/dataplane-mode-")
    wait_for(lambda: "plain/web" not in enrolled(kube_lab, "node1"), 15, "plain/web released")


def test_the_agents_credentials_read_state_but_no_secrets(kube_lab):
    assert kubectl(kube_lab, "get", "pods", "-A", user="agent-node1").returncode == 0
    denied = kubectl(kube_lab, "get", "secrets", "-A", user="agent-node1")
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr


def test_the_kubernetes_source_follows_the_api(kube_lab):
    """runtime/sources/kubernetes.py against the real API server: list, then watch; a node's
    source sees only its own pods (issue 20, item 1 in part)."""
    from veil.lab.controlplane import cp_netns  # noqa: PLC0415
    from veil.lab.netns import nsenter_argv  # noqa: PLC0415

    kubeconfig = str(controlplane.kube_dir(kube_lab) / "admin.kubeconfig")
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


POLICY = """
apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: crd-test, namespace: default}
spec:
"""


@pytest.mark.parametrize(
    ("spec", "refusal"),
    [
        ("  action: CUSTOM", "CUSTOM needs provider.name and targetRefs"),
        (
            "  action: CUSTOM\n  provider: {name: authz}",
            "CUSTOM needs provider.name and targetRefs",
        ),
        ("  provider: {name: authz}", "provider is only for action CUSTOM"),
        ("  action: SOMETIMES", 'Unsupported value: "SOMETIMES"'),
        ("  actions: DENY", ".spec.actions: field not declared in schema"),
        ("  rules: [{to: [{operation: {ports: ['70000']}}]}]", "should match"),
        ("  rules: [{to: [{operation: {port: ['80']}}]}]", "field not declared in schema"),
        ("  rules: [{from: [{source: {ipBlocks: [not-an-ip]}}]}]", "should match"),
        ("  rules: [{when: [{key: source.nowhere, values: [x]}]}]", "should match"),
        ("  targetRefs: [{kind: Deployment, name: x}]", 'Unsupported value: "Deployment"'),
    ],
)
def test_the_crd_schema_refuses_what_the_parser_refuses(kube_lab, spec, refusal):
    proc = kubectl(kube_lab, "apply", "--server-side", "-f", "-", stdin=POLICY + spec)
    assert proc.returncode != 0 and refusal in proc.stderr, proc.stderr
    import yaml  # noqa: PLC0415

    from veil.core.authz import PolicyError, parse_policy  # noqa: PLC0415

    with pytest.raises((PolicyError, ValueError)):  # the parser refuses it too
        parse_policy(yaml.safe_load(POLICY + spec))


def test_every_example_policy_is_accepted_by_the_crds(kube_lab):
    root = Path(__file__).resolve().parents[2] / "examples"
    kubectl(
        kube_lab,
        "apply",
        "-f",
        "-",
        stdin="{apiVersion: v1, kind: Namespace, metadata: {name: shop}}",
    )
    for d in ("shop-policies", "shop-waypoint"):
        proc = kubectl(kube_lab, "apply", "--server-side", "--dry-run=server", "-f", str(root / d))
        assert proc.returncode == 0, proc.stderr


WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: mesh}
spec:
  gatewayClassName: veil-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def waypoint_pod(lab: str) -> dict[str, Any] | None:
    pods = get(lab, "pods", "-n", "mesh", "-l", "gateway.networking.k8s.io/gateway-name")["items"]
    ready = [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and p["status"].get("podIP")
        and not p["metadata"].get("deletionTimestamp")  # one of a Gateway deleted before
    ]
    return ready[0] if ready else None


def test_a_gateway_gets_its_waypoint_and_traffic_goes_through_it(kube_lab):
    """The controller turns a Gateway of class veil-waypoint into a ServiceAccount, Service,
    ConfigMap and Deployment owned by it; the waypoint pod gets its identity from the CA with
    its projected token (TokenReview); a Service labelled to use it is served through it; the
    Gateway's status says Programmed with the Service's address; deleting it removes all."""
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=WAYPOINT).returncode == 0

    def programmed() -> dict[str, Any] | None:
        gw = get(kube_lab, "gateway", "-n", "mesh", "waypoint")
        conds = {c["type"]: c["status"] for c in gw.get("status", {}).get("conditions", [])}
        return gw if conds.get("Programmed") == "True" else None

    gw = wait_for(programmed, 90, "the Gateway Programmed")
    svc = get(kube_lab, "service", "-n", "mesh", "waypoint")
    assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": svc["spec"]["clusterIP"]}]
    for kind in ("deployment", "serviceaccount", "service", "configmap/waypoint-ca-root"):
        obj = get(kube_lab, *kind.split("/"), "-n", "mesh", *([] if "/" in kind else ["waypoint"]))
        assert obj["metadata"]["ownerReferences"][0]["uid"] == gw["metadata"]["uid"]
    pod = wait_for(lambda: waypoint_pod(kube_lab), 60, "the waypoint pod")
    label = kubectl(
        kube_lab, "label", "service", "-n", "mesh", "server", "veil.dev/use-waypoint=waypoint"
    )
    assert label.returncode == 0, label.stderr
    try:
        ns = f"veil-{kube_lab}-mesh_{pod['metadata']['name']}"

        def served() -> bool:
            out = curl_json(kube_lab, "client", "http://server.mesh/", ns="mesh")
            _code, body = controlplane.agent_get(ns, "/metrics", 15020)
            return out["pod"].startswith("server-") and 'reporter="waypoint"' in body

        wait_for(served, 30, "a request served through the waypoint")
    finally:
        kubectl(kube_lab, "label", "service", "-n", "mesh", "server", "veil.dev/use-waypoint-")
    assert kubectl(kube_lab, "delete", "gateway", "-n", "mesh", "waypoint").returncode == 0
    wait_for(
        lambda: not get(kube_lab, "deployments,services,serviceaccounts,configmaps,pods",
                        "-n", "mesh", "-l", "gateway.networking.k8s.io/gateway-name=waypoint",
                        )["items"],
        60,
        "the waypoint's objects collected",
    )  # fmt: skip


def test_the_ca_reviews_projected_tokens_and_binds_them_to_their_pod(kube_lab):
    """A waypoint's projected token (audience veil-ca) obtains its own identity and no other;
    a pod's ordinary service-account token (the API server's audience) obtains nothing."""
    from veil.core.csr import build_csr, new_key  # noqa: PLC0415
    from veil.core.spiffe import SpiffeId  # noqa: PLC0415

    assert kubectl(kube_lab, "apply", "-f", "-", stdin=WAYPOINT).returncode == 0
    try:
        pod = wait_for(lambda: waypoint_pod(kube_lab), 90, "the waypoint pod")
        node, uid = pod["spec"]["nodeName"], pod["metadata"]["uid"]
        kubelet = store.lab_dir(kube_lab) / "kubelet" / node / uid / "volumes"
        token = wait_for(
            lambda: (
                (kubelet / "veil-token" / "token").exists()
                and (kubelet / "veil-token" / "token").read_text()
            ),
            30,
            "the projected token",
        )

        def ask(identity: SpiffeId, bearer: str) -> tuple[int, dict[str, Any]]:
            csr = build_csr(new_key(), identity).decode()
            return controlplane.ca_request(
                kube_lab, node, {"identity": str(identity), "csr": csr}, bearer
            )

        own = SpiffeId("cluster.local", "mesh", "waypoint")
        status, doc = ask(own, token)
        assert status == 200, doc
        status, doc = ask(SpiffeId("cluster.local", "mesh", "server"), token)
        assert (status, doc["code"]) == (403, "not_this_identity"), doc
        default = next(p for p in kubelet.glob("kube-api-access-*/token"))
        status, doc = ask(own, default.read_text())
        assert status == 401 and "audience" in doc["error"], doc  # refused by the API server
    finally:
        kubectl(kube_lab, "delete", "gateway", "-n", "mesh", "waypoint", "--wait=false")


DENY_SERVER_A = """
apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]
"""


def client_reaches(lab: str, ip: str) -> bool:
    """Whether mesh/client gets an answer from ip:8080 (within 3 s)."""
    proc = lab_exec(lab, "client", "curl", "-s", "-m", "3", f"http://{ip}:8080/", ns="mesh",
                    check=False)  # fmt: skip
    return proc.returncode == 0


def accepted(lab: str, name: str) -> dict[str, Any] | None:
    obj = get(lab, "authorizationpolicy", "-n", "mesh", name)
    conds = obj.get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == "Accepted"), None)


def test_a_policy_applied_with_kubectl_is_enforced_and_says_accepted(kube_lab):
    ip = get(kube_lab, "pod", "-n", "mesh", "server-a")["status"]["podIP"]

    def answered() -> bool:
        return client_reaches(kube_lab, ip)

    assert answered()
    start = time.monotonic()
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=DENY_SERVER_A).returncode == 0
    try:
        wait_for(lambda: not answered(), 10, "the DENY enforced")
        took = time.monotonic() - start
        assert took < 2.0, f"enforced {took:.1f}s after kubectl apply"
        cond = wait_for(lambda: accepted(kube_lab, "deny-client"), 15, "status written")
        assert (cond["status"], cond["reason"]) == ("True", "Accepted"), cond
        table = kubectl(kube_lab, "get", "authorizationpolicies", "-n", "mesh").stdout
        assert "ACCEPTED" in table and "deny-client" in table and "True" in table
    finally:
        kubectl(kube_lab, "delete", "authorizationpolicy", "-n", "mesh", "deny-client")
    wait_for(answered, 10, "allowed again")


def test_a_policy_the_schema_lets_through_but_the_parser_refuses_is_marked_and_fails_closed(
    kube_lab,
):
    """999.1.1.1 fits the schema's pattern but is no address: the policy is marked
    Accepted=False with the parser's reason, and an ALLOW that cannot be read allows nothing
    (it stands as deny-all for what it selects), never everything."""
    bad = """
apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: broken-allow, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {ipBlocks: [999.1.1.1]}}]}]
"""
    ip = get(kube_lab, "pod", "-n", "mesh", "server-a")["status"]["podIP"]
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=bad).returncode == 0
    try:
        cond = wait_for(lambda: accepted(kube_lab, "broken-allow"), 15, "status written")
        assert (cond["status"], cond["reason"]) == ("False", "Invalid"), cond
        assert "999.1.1.1" in cond["message"]
        assert not client_reaches(kube_lab, ip)  # refused: never fails open
    finally:
        kubectl(kube_lab, "delete", "authorizationpolicy", "-n", "mesh", "broken-allow")


ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-server, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules: [{backendRefs: [{name: server, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-web, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules: [{backendRefs: [{name: web, namespace: plain, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-to-server, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules: [{backendRefs: [{name: server, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: tcp-to-nowhere, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules: [{backendRefs: [{name: nowhere, port: 80}]}]
"""


def test_routes_get_accepted_and_resolved_refs_per_parent(kube_lab):
    """The route status Gateway API defines, written by Veil's controller and accepted by the
    upstream CRD's schema (HTTPRoute, GRPCRoute, TCPRoute): a backend in another namespace
    without a ReferenceGrant is not resolved (RefNotPermitted), nor one that does not exist."""
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=ROUTES).returncode == 0
    try:

        def verdicts(name: str, kind: str = "httproute") -> dict[str, tuple[str, str]] | None:
            parents = get(kube_lab, kind, "-n", "mesh", name).get("status", {}).get("parents")
            if not parents:
                return None
            assert parents[0]["controllerName"] == "veil.dev/waypoint-controller"
            return {c["type"]: (c["status"], c["reason"]) for c in parents[0]["conditions"]}

        good = wait_for(lambda: verdicts("to-server"), 15, "the route's status")
        assert good == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        cross = wait_for(lambda: verdicts("to-web"), 15, "the route's status")
        assert cross["ResolvedRefs"] == ("False", "RefNotPermitted")
        grpc = wait_for(lambda: verdicts("grpc-to-server", "grpcroute"), 15, "GRPCRoute status")
        assert grpc == good
        tcp = wait_for(lambda: verdicts("tcp-to-nowhere", "tcproute"), 15, "TCPRoute status")
        assert tcp == {
            "Accepted": ("True", "Accepted"),
            "ResolvedRefs": ("False", "BackendNotFound"),
        }
    finally:
        kubectl(kube_lab, "delete", "-f", "-", stdin=ROUTES)


def ready(lab: str, node: str) -> tuple[int, str]:
    return controlplane.agent_get(f"veil-{lab}-{node}", "/healthz/ready", 15021)


def test_the_api_server_away_for_30s_keeps_traffic_and_policy_then_resyncs(kube_lab):
    """kube-apiserver stopped for 30 s: connections keep working, a DENY in force stays in
    force (the last good state), the agents say they are not synced; once it is back they
    resync, and a change made then is followed."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    a = get(kube_lab, "pod", "-n", "mesh", "server-a")["status"]["podIP"]
    b = get(kube_lab, "pod", "-n", "mesh", "server-b")["status"]["podIP"]

    def answered(ip: str) -> bool:
        return client_reaches(kube_lab, ip)

    only_a = DENY_SERVER_A.replace(
        "rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]",
        "rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}], "
        f"when: [{{key: destination.ip, values: ['{a}']}}]}}]",
    )
    assert only_a != DENY_SERVER_A
    assert kubectl(kube_lab, "apply", "-f", "-", stdin=only_a).returncode == 0
    wait_for(lambda: not answered(a), 10, "the DENY enforced")
    assert answered(b)
    record = store.read_record(kube_lab) or {}
    api = controlplane.process_view(
        next(p for p in record["processes"] if p["name"] == "kube-apiserver")
    )
    os.kill(api["supervisor"], signal.SIGSTOP)  # no restart until we say so
    stopped = time.monotonic()
    try:
        os.kill(api["pid"], signal.SIGKILL)  # a crash: every connection to it ends
        _code, why = wait_for(
            lambda: (r := ready(kube_lab, "node1"))[0] != 200 and r, 30, "not ready"
        )
        assert "not synced" in why, why
        while time.monotonic() - stopped < 30:
            assert answered(b)  # traffic keeps working
            assert not answered(a)  # and the policy holds
            time.sleep(2)
    finally:
        os.kill(api["supervisor"], signal.SIGCONT)
    wait_for(lambda: ready(kube_lab, "node1")[0] == 200, 90, "ready again")
    assert (
        kubectl(kube_lab, "delete", "authorizationpolicy", "-n", "mesh", "deny-client").returncode
        == 0
    )
    wait_for(lambda: answered(a), 15, "the deletion followed after the resync")


REPLICA = """
import json, sys
from veil.ca.signer import SecretCaStorage, generate_root
from veil.core.certs import pem
from veil.runtime.sources import kube_sync_client
storage = SecretCaStorage(kube_sync_client(sys.argv[1]), "veil-system", "veil-ca")
first = storage.load()
second = storage.save(generate_root("cluster.local"))  # a replica racing to create it
print(json.dumps({"first": pem(first.cert), "second": pem(second.cert)}))
"""


def test_the_ca_keeps_its_root_in_a_secret_that_replicas_share(kube_lab):
    """The CA made Secret veil-system/veil-ca on its first start and published the bundle as
    ConfigMap veil-ca-root; a second replica storing a root of its own finds the first one's
    (409) and uses it, so every replica signs with the same root. (Run in the control-plane
    netns, where the API server is.)"""
    admin = str(controlplane.kube_dir(kube_lab) / "admin.kubeconfig")
    argv = netns.nsenter_argv(
        controlplane.cp_netns(kube_lab), [sys.executable, "-c", REPLICA, admin]
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    roots = json.loads(proc.stdout)
    assert roots["second"] == roots["first"]
    bundle = get(kube_lab, "configmap", "-n", "veil-system", "veil-ca-root")["data"]
    assert bundle["root-cert.pem"] == roots["first"]
    served = (controlplane.ca_dir(kube_lab) / "trust-bundle.pem").read_text()
    assert roots["first"] in served
    assert not (controlplane.ca_dir(kube_lab) / "ca-key.pem").exists()  # the key: only there


AGENT_POD = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: veil-agent, namespace: veil-system}
---
apiVersion: v1
kind: Pod
metadata: {name: agent-token, namespace: veil-system}
spec:
  nodeName: node1
  serviceAccountName: veil-agent
  containers: [{name: c, image: busybox, command: [sleep, infinity]}]
  volumes:
  - name: veil-token
    projected:
      sources: [{serviceAccountToken: {audience: veil-ca, expirationSeconds: 3600, path: token}}]
"""


def test_an_agents_token_obtains_its_nodes_identities_and_no_others(kube_lab):
    """A real projected token of the agents' service account, bound to a pod on node1: the
    CA (TokenReview) takes it as node1's credential, so it obtains the identity of a
    workload on node1 and is refused one that runs only on node2."""
    from veil.core.csr import build_csr, new_key  # noqa: PLC0415
    from veil.core.spiffe import SpiffeId  # noqa: PLC0415

    assert kubectl(kube_lab, "apply", "-f", "-", stdin=AGENT_POD).returncode == 0
    try:
        pod = wait_for(
            lambda: (
                (p := get(kube_lab, "pod", "-n", "veil-system", "agent-token"))["status"].get(
                    "podIP"
                )
                and p
            ),
            60,
            "the pod",
        )
        token_file = (
            (store.lab_dir(kube_lab) / "kubelet" / "node1" / pod["metadata"]["uid"] / "volumes")
            / "veil-token"
            / "token"
        )
        token = token_file.read_text()

        def ask(identity: SpiffeId) -> tuple[int, dict[str, Any]]:
            csr = build_csr(new_key(), identity).decode()
            body = {"identity": str(identity), "csr": csr}
            return controlplane.ca_request(kube_lab, "node1", body, token)

        status, doc = ask(SpiffeId("cluster.local", "mesh", "client"))  # client runs on node1
        assert status == 200, doc
        status, doc = ask(SpiffeId("cluster.local", "mesh", "default"))  # optout: node2 only
        assert (status, doc["code"]) == (403, "not_on_node"), doc
        assert "node node1 may not obtain" in doc["error"]
    finally:
        kubectl(kube_lab, "delete", "pod", "-n", "veil-system", "agent-token", "--wait=false")


REQUEST_AUTHN = """
apiVersion: security.veil.dev/v1
kind: RequestAuthentication
metadata: {name: crd-test, namespace: default}
spec:
  targetRefs: [{kind: Service, name: web}]
  jwtRules:
"""


@pytest.mark.parametrize(
    ("rule", "refusal"),
    [
        ("  - {issuer: https://idp, jwksUri: 'http://idp/keys'}", "should match"),
        ("  - {issuer: idp.example}", "OIDC discovery"),
        ("  - {issuer: https://idp, fromCookies: ['']}", "should be at least 1 chars long"),
    ],
)
def test_the_crd_schema_refuses_key_sources_the_parser_refuses(kube_lab, rule, refusal):
    """jwksUri https or file only; without keys, an https issuer for OIDC discovery."""
    proc = kubectl(kube_lab, "apply", "--server-side", "-f", "-", stdin=REQUEST_AUTHN + rule)
    assert proc.returncode != 0 and refusal in proc.stderr, proc.stderr
    import yaml  # noqa: PLC0415

    from veil.core.jwt import JwtError, parse_request_authentication  # noqa: PLC0415

    with pytest.raises(JwtError):
        parse_request_authentication(yaml.safe_load(REQUEST_AUTHN + rule))


def test_the_crd_accepts_remote_keys_and_discovery(kube_lab):
    ok = "  - {issuer: https://idp.example, fromCookies: [session]}\n"
    ok += "  - {issuer: https://b.example, jwksUri: 'https://b.example/keys'}"
    proc = kubectl(kube_lab, "apply", "--server-side", "--dry-run=server", "-f", "-",
                   stdin=REQUEST_AUTHN + ok)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_zz_a_crashed_lab_is_removed_whole(kube_lab):
    """Last in the module: every lab process killed at once (supervisors first, so nothing is
    restarted), as a crash would leave it; the fixture's `veil lab down` must still remove
    every process, netns, mount point and file (it asserts no leftovers)."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    record = store.read_record(kube_lab) or {}
    views = [controlplane.process_view(p) for p in record["processes"]]
    for v in views:
        os.kill(v.get("supervisor", v["pid"]), signal.SIGKILL)
    for v in views:
        with contextlib.suppress(ProcessLookupError):
            os.kill(v["pid"], signal.SIGKILL)
    targets = (store.lab_dir(kube_lab) / "kubelet" / "mountpoints").read_text().split()
    assert targets  # the kubelets had to make mount points on the host
    veil("lab", "down", "--name", kube_lab, timeout=120)
    assert not any(Path(t).exists() for t in targets), targets
