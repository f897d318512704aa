"""The lab plan: scheduling, VIP allocation, endpoints, hosts files and NAT rules."""

import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from veil.lab.manifests import ManifestError, load_paths, parse_text
from veil.lab.plan import (
    check_lab_name,
    endpoints,
    make_plan,
    node_names,
    pod_capacity,
    recorded_mask,
    render_hosts,
    render_resolv_conf,
    render_service_nat,
)

EXAMPLES = Path(__file__).parents[2] / "examples" / "shop"
GOLDEN = Path(__file__).parent / "golden"

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"


def pod(name: str, node: str | None = None, labels: str = "{app: x}", ns: str = "shop") -> str:
    node_line = f"  nodeName: {node}\n" if node else ""
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, "
        f"labels: {labels}}}\nspec:\n{node_line}  containers: [{{name: c, command: [sleep, "
        f"'1'], ports: [{{name: http, containerPort: 8080}}]}}]\n---\n"
    )


def svc(name: str, ip: str | None = None, target: str = "8080", app: str = "x") -> str:
    ip_line = f", clusterIP: {ip}" if ip else ""
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{selector: {{app: {app}}}, ports: [{{port: 80, targetPort: {target}}}]"
        f"{ip_line}}}\n---\n"
    )


def plan_of(text: str, nodes: int = 2):
    return make_plan(parse_text(text, "t.yaml"), "t", nodes)


def test_shop_plan_spreads_pods_over_two_nodes():
    plan = make_plan(load_paths([EXAMPLES]), "demo", 2)
    nodes = {p.node for p in plan.pods}
    assert nodes == {"node1", "node2"}
    frontends = [p for p in plan.pods if p.owner == "frontend"]
    assert {p.node for p in frontends} == {"node1", "node2"}
    client = next(p for p in plan.pods if p.name == "client")
    assert client.node == "node1"
    assert [str(n.pod_cidr) for n in plan.nodes] == ["10.244.1.0/24", "10.244.2.0/24"]


def test_scheduling_respects_pins_and_balances_the_rest():
    text = NS + pod("a", "node1") + pod("b", "node1") + pod("c") + pod("d") + pod("e")
    placed = {p.name: p.node for p in plan_of(text, 3).pods}
    assert placed["a"] == placed["b"] == "node1"
    assert placed["c"] == "node2" and placed["d"] == "node3"
    assert placed["e"] == "node2"  # node1 has 2, node2 1, node3 1 -> lowest index wins
    assert {p.name: p.node for p in plan_of(text, 3).pods} == placed  # deterministic


def test_deployment_replicas_become_pods():
    text = (
        NS
        + """apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, command: [sleep, '1']}]}
"""
    )
    pods = plan_of(text).pods
    assert [p.name for p in pods] == ["web-0", "web-1", "web-2"]
    assert all(p.owner == "web" and p.labels == {"app": "web"} for p in pods)


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        (pod("a", ns="nowhere"), "metadata.namespace", "not defined"),
        (NS + pod("a", "node9"), "spec.nodeName", "no node 'node9'"),
        (
            NS + pod("a").replace("containers:", "serviceAccountName: ghost\n  containers:"),
            "spec.serviceAccountName",
            "service account 'ghost'",
        ),
        (NS + svc("s", "10.97.0.1"), "spec.clusterIP", "outside the service range"),
        (
            NS + svc("s", "10.96.0.20") + svc("t", "10.96.0.20"),
            "spec.clusterIP",
            "already used by Service shop/s",
        ),
        (NS + svc("s", "banana"), "spec.clusterIP", "not an IPv4 address"),
    ],
)
def test_reference_errors(text, path, words):
    with pytest.raises(ManifestError) as e:
        plan_of(text)
    assert e.value.path == path
    assert words in e.value.message


def test_vip_allocation_skips_explicit_addresses():
    text = NS + svc("a") + svc("b", "10.96.0.11") + svc("c")
    ips = {s.name: str(s.cluster_ip) for s in plan_of(text).services}
    assert ips == {"a": "10.96.0.10", "b": "10.96.0.11", "c": "10.96.0.12"}


def test_endpoints_follow_selector_readiness_and_named_ports():
    text = NS + pod("a") + pod("b") + pod("c", labels="{app: other}") + svc("s", target="http")
    plan = plan_of(text)
    ips = {("shop", p.name): IPv4Address(f"10.244.1.{i + 10}") for i, p in enumerate(plan.pods)}
    service = plan.services[0]
    ready = [("shop", "a"), ("shop", "c")]
    eps = endpoints(service, service.ports[0], plan.pods, ips, ready)
    assert [(e.pod, str(e.ip), e.port) for e in eps] == [("a", "10.244.1.10", 8080)]
    missing = svc("s", target="grpc")
    plan2 = plan_of(NS + pod("a") + missing)
    s2 = plan2.services[0]
    assert endpoints(s2, s2.ports[0], plan2.pods, ips, [("shop", "a")]) == []


def test_hosts_file_gives_short_names_only_in_own_namespace():
    plan = make_plan(load_paths([EXAMPLES]), "demo", 2)
    client = next(p for p in plan.pods if p.name == "client")
    hosts = render_hosts(client, IPv4Address("10.244.1.13"), plan.services)
    assert "10.244.1.13\tclient\n" in hosts
    lines = {
        line.split("\t")[0]: line.split("\t")[1].split()
        for line in hosts.splitlines()
        if line.startswith("10.96.")
    }
    by_name = {names[-1]: names for names in lines.values()}
    assert by_name["frontend.shop.svc.cluster.local"][0] == "frontend"
    assert by_name["orders.backoffice.svc.cluster.local"][0] == "orders.backoffice"
    assert "search shop.svc.cluster.local" in render_resolv_conf(client)


def test_service_nat_rules_golden():
    text = (
        NS
        + pod("a")
        + pod("b")
        + pod("c")
        + svc("web", "10.96.0.10")
        + svc("empty", "10.96.0.11", app="none")
    )
    plan = plan_of(text)
    ips = {("shop", p.name): IPv4Address(f"10.244.1.{i + 10}") for i, p in enumerate(plan.pods)}
    ready = list(ips)
    table = [
        (s, port, endpoints(s, port, plan.pods, ips, ready))
        for s in plan.services
        for port in s.ports
    ]
    rules = render_service_nat(table)
    golden = GOLDEN / "service-nat.rules"
    if os.environ.get("VEIL_UPDATE_GOLDEN"):  # regenerate, review the diff, commit
        golden.write_text(rules)
    assert rules == golden.read_text()
    assert "--probability 0.33333333333" in rules and "--probability 0.50000000000" in rules
    assert "empty:80 has no endpoints" in rules


@pytest.mark.parametrize("name", ["", "Lab", "a-b", "1lab", "abcdefghijklm", "a_b"])
def test_bad_lab_names(name):
    with pytest.raises(ValueError, match="invalid lab name"):
        check_lab_name(name)


def test_a_waypoint_gateway_gets_its_pod_and_service_account():
    gw = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: waypoint, namespace: shop}\n"
        "spec: {gatewayClassName: veil-waypoint, listeners: [{name: mesh, port: 15008, "
        "protocol: HBONE}]}\n---\n"
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: ingress, namespace: shop}\nspec: {gatewayClassName: other}\n---\n"
    )
    plan = plan_of(NS + gw)
    (wp,) = list(plan.pods)  # only the veil-waypoint class gets a pod
    assert (wp.namespace, wp.name, wp.spec.service_account) == ("shop", "waypoint-0", "waypoint")
    assert wp.labels == {
        "gateway.networking.k8s.io/gateway-name": "waypoint",
        "veil.dev/dataplane-mode": "none",  # it speaks HBONE itself
    }
    assert wp.spec.containers[0].command[:2] == ("veil", "waypoint")
    assert ("shop", "waypoint") in {(a.meta.namespace, a.meta.name) for a in plan.service_accounts}
    assert wp.node in ("node1", "node2")


WAYPOINT_GW = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop, annotations: {veil.dev/replicas: "REPLICAS"}}
spec: {gatewayClassName: veil-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""


def test_a_waypoint_gateway_gets_the_pods_its_replicas_annotation_asks_for():
    pods = [p for p in plan_of(NS + WAYPOINT_GW.replace("REPLICAS", "2")).pods if p.owner == "wp"]
    assert sorted(p.name for p in pods) == ["wp-0", "wp-1"]
    assert len({p.node for p in pods}) == 2  # spread
    with pytest.raises(ManifestError, match=r"veil\.dev/replicas"):
        plan_of(NS + WAYPOINT_GW.replace("REPLICAS", "0"))


def test_more_pods_than_a_node_has_addresses_is_refused_before_bring_up():
    """A node's /24 gives 245 pod addresses (from .10): past that the lab said so only at
    the first failed CNI ADD, minutes into `lab up`."""
    fits = NS + "".join(pod(f"p{i}", "node1") for i in range(245))
    assert len(plan_of(fits).pods) == 245
    with pytest.raises(ValueError, match=r"node1 would hold 246 pods, but its pod range"):
        plan_of(fits + pod("one-more", "node1"))
    spread = NS + "".join(pod(f"p{i}") for i in range(300))  # unpinned: spread, fits
    assert len(plan_of(spread).pods) == 300


def test_a_node_range_is_the_i_th_subnet_of_its_mask():
    assert [str(n.pod_cidr) for n in node_names(3)] == [
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.3.0/24",
    ]
    assert [str(n.pod_cidr) for n in node_names(2, 22)] == ["10.244.4.0/22", "10.244.8.0/22"]
    assert recorded_mask("10.244.8.0/22") == 22
    assert pod_capacity(node_names(1, 23)[0]) == 501


def test_a_mask_too_small_for_the_nodes_or_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"between 1 and 15 \(a /20 per node"):
        node_names(16, 20)
    with pytest.raises(ValueError, match="mask-size must be between 20 and 28"):
        node_names(2, 30)


def test_500_pods_fit_a_node_with_a_23_range_but_not_a_24():
    pods = "\n---\n".join(
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  nodeName: node1\n"
        "  containers: [{name: c, command: [sleep, inf]}]"
        for i in range(500)
    )
    with pytest.raises(ValueError, match="--node-cidr-mask-size"):
        make_plan(parse_text(pods, "t.yaml"), "t", 2)
    plan = make_plan(parse_text(pods, "t.yaml"), "t", 2, 23)
    assert sum(p.node == "node1" for p in plan.pods) == 500
