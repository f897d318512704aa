"""The lab as a user drives it: `veil lab up/exec/status/down` on real network namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.lab import (
    MESH,
    ROOT,
    SHOP,
    SOURCE_MODES,
    VEIL,
    alive,
    curl_json,
    enrolled,
    lab_exec,
    lab_pids,
    leftovers,
    new_lab_name,
    veil,
)
from veil.lab import cgroups, netns, store


def pod_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in status["pods"] if p["name"] == name)


def service_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status["services"] if s["name"] == name)


def test_pod_to_pod_across_nodes(shop_lab, lab_status):
    client = pod_of(lab_status, "client")
    target = next(
        p
        for p in lab_status["pods"]
        if p["name"].startswith("frontend-") and p["node"] != client["node"]
    )
    answer = curl_json(shop_lab, "client", f"http://{target['ip']}:8080/")
    assert answer["pod"] == target["name"]
    assert answer["node"] == target["node"] != client["node"]
    assert answer["client"].split(":")[0] == client["ip"]  # no NAT between pods


def test_service_by_name_and_vip_spreads_over_endpoints(shop_lab, lab_status):
    catalog = service_of(lab_status, "catalog")
    assert len(catalog["endpoints"]) == 2
    seen = {curl_json(shop_lab, "client", "http://catalog:9080/")["pod"] for _ in range(16)}
    assert seen == {"catalog-v1-0", "catalog-v2-0"}
    by_vip = curl_json(shop_lab, "client", f"http://{catalog['clusterIP']}:9080/")
    assert by_vip["pod"] in seen
    assert by_vip["client"].split(":")[0] == pod_of(lab_status, "client")["ip"]


def test_service_names_across_namespaces(shop_lab, lab_status):
    cart_node = pod_of(lab_status, "cart-0")["node"]
    for url in (
        "http://cart.shop:7070/",
        "http://cart.shop.svc:7070/",
        "http://cart.shop.svc.cluster.local:7070/",
    ):
        answer = curl_json(shop_lab, "legacy", url, ns="backoffice")
        assert (answer["pod"], answer["node"]) == ("cart-0", cart_node)
    # A short name resolves only inside its own namespace, and fails at once elsewhere.
    start = time.monotonic()
    short = lab_exec(
        shop_lab, "legacy", "curl", "-sS", "--max-time", "5", "http://cart:7070/", check=False
    )
    assert short.returncode == 6, short.stderr  # could not resolve host
    assert time.monotonic() - start < 3


def test_service_port_maps_to_named_target_port(shop_lab):
    answer = curl_json(shop_lab, "client", "http://frontend/")  # port 80 -> "http" (8080)
    assert answer["pod"].startswith("frontend-")


def test_service_without_endpoints_refuses_at_once(shop_lab, lab_status):
    assert service_of(lab_status, "nobody")["endpoints"] == []
    out = lab_exec(
        shop_lab, "client", "curl", "-sS", "--max-time", "5", "http://nobody/", check=False
    )
    assert out.returncode == 7, out.stderr  # connection refused, not a timeout


def test_status_matches_reality(shop_lab, lab_status):
    record = store.read_record(shop_lab)
    assert record is not None
    entries = {(p["namespace"], p["name"]): p for p in record["pods"]}
    nodes = {n["name"]: n for n in lab_status["nodes"]}
    assert set(nodes) == {"node1", "node2"}
    assert len(lab_status["pods"]) == 11  # incl. the waypoint and the two ratings replicas
    for p in lab_status["pods"]:
        entry = entries[(p["namespace"], p["name"])]
        assert p["phase"] == "Running"
        addrs = netns.ip(entry["netns"], "-4", "-o", "addr", "show", "dev", "eth0")
        assert f"inet {p['ip']}/" in addrs
        assert IPv4Address(p["ip"]) in IPv4Network(nodes[p["node"]]["podCIDR"])
        route = netns.ip(f"veil-{shop_lab}-{p['node']}", "route", "get", p["ip"])
        assert " dev veth" in route  # the pod hangs off the node its status names
        assert all(alive(pid) for pid in entry["pids"])
    hosts = (Path("/etc/netns") / entries[("shop", "client")]["netns"] / "hosts").read_text()
    for s in lab_status["services"]:
        assert f"{s['clusterIP']}\t" in hosts
        selected = {p["ip"] for p in lab_status["pods"] if p["name"].startswith(s["name"])}
        assert {e.split(":")[0] for e in s["endpoints"]} == selected


def test_state_directory_holds_objects_with_status(shop_lab, lab_status):
    state = store.state_dir(shop_lab)
    pod = yaml.safe_load((state / "pods" / "shop" / "client.yaml").read_text())
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"] == pod_of(lab_status, "client")["ip"]
    assert pod["spec"]["nodeName"] == "node1"
    assert pod["metadata"]["annotations"]["lab.veil.dev/netns"] == f"veil-{shop_lab}-shop_client"
    svc = yaml.safe_load((state / "services" / "shop" / "catalog.yaml").read_text())
    assert svc["spec"]["clusterIP"] == service_of(lab_status, "catalog")["clusterIP"]
    eps = yaml.safe_load((state / "endpointslices" / "shop" / "catalog.yaml").read_text())
    assert sorted(e["targetRef"]["name"] for e in eps["endpoints"]) == [
        "catalog-v1-0",
        "catalog-v2-0",
    ]
    ns = yaml.safe_load((state / "namespaces" / "shop.yaml").read_text())
    assert ns["status"]["phase"] == "Active"
    policy = state / "authorizationpolicies" / "shop" / "allow-nothing.yaml"
    assert yaml.safe_load(policy.read_text())["apiVersion"] == "security.veil.dev/v1"
    assert (state / "gateways" / "shop" / "waypoint.yaml").exists()
    assert (state / "nodes" / "node2.yaml").exists()


def test_pod_processes_and_exec_run_in_the_pod_cgroup(shop_lab):
    record = store.read_record(shop_lab)
    assert record is not None
    entry = next(p for p in record["pods"] if p["name"] == "frontend-0")
    group = Path(entry["cgroup"])
    assert group.parent.parent == cgroups.lab_group(shop_lab)
    assert entry["pids"][0] in cgroups.procs(group)
    out = lab_exec(shop_lab, "client", "cat", "/proc/self/cgroup").stdout
    assert f"0::/veil/{shop_lab}/pods/shop_client" in out


def test_nothing_is_linked_to_the_root_netns(shop_lab):
    routes = subprocess.run(
        ["ip", "-4", "route"], capture_output=True, text=True, check=True
    ).stdout
    assert "10.244." not in routes and "172.30.0." not in routes
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"veil-{shop_lab}" not in links
    for line in links.splitlines():  # no veth whose peer lives in one of the lab's netns
        assert "link-netns veil-" not in line


def test_exec_errors_are_clear(shop_lab):
    out = veil("lab", "exec", "--name", shop_lab, "ghost", "--", "true", check=False)
    assert out.returncode == 1 and "no pod 'ghost'" in out.stderr
    out = lab_exec(shop_lab, "deploy/frontend", "sh", "-c", "echo $POD_NAME")
    assert out.stdout.strip() == "frontend-0"
    assert lab_exec(shop_lab, "client", "false", check=False).returncode == 1


def test_second_up_with_the_same_name_is_refused(shop_lab):
    out = veil("lab", "up", "-f", SHOP, "--name", shop_lab, check=False)
    assert out.returncode == 1
    assert "already exists" in out.stderr and f"veil lab down --name {shop_lab}" in out.stderr


def test_invalid_manifest_creates_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(SHOP, "10-shop.yaml").read_text().replace("replicas: 2", 'replicas: "two"'))
    (tmp_path / "ns.yaml").write_text(Path(SHOP, "00-namespaces.yaml").read_text())
    name = new_lab_name()
    out = veil("lab", "up", "-f", str(tmp_path), "--name", name, check=False)
    assert out.returncode == 2
    assert f"{bad}#1: Deployment shop/frontend: spec.replicas: expected an integer" in out.stderr
    assert leftovers(name) == []


def test_down_cleans_up_after_kill_9_of_up():
    name = new_lab_name()
    up = subprocess.Popen(
        [VEIL, "lab", "up", "-f", SHOP, "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        # Kill it midway: once some pods run but before the lab is complete.
        while time.monotonic() < deadline:
            if len(lab_pids(name)) >= 3:
                break
            time.sleep(0.01)
        up.kill()
        up.wait()
        assert leftovers(name), "up was killed before it created anything"
        pids = lab_pids(name)
        veil("lab", "down", "--name", name)
        assert leftovers(name) == []
        assert not [pid for pid in pids if alive(pid)]
        again = veil("lab", "down", "--name", name)  # idempotent
        assert "nothing to remove" in again.stdout
    finally:
        veil("lab", "down", "--name", name, check=False)


def test_a_failing_test_still_removes_its_lab(tmp_path):
    """The fixture's cleanup runs when the test using it fails midway."""
    test_file = tmp_path / "test_fails.py"
    test_file.write_text(
        textwrap.dedent("""
        import json
        from tests.support.lab import shop_lab, veil  # noqa: F401

        def test_fails(shop_lab):
            st = json.loads(veil("lab", "status", "--name", shop_lab, "-o", "json").stdout)
            print("LAB", shop_lab, sorted(p["name"] for p in st["pods"]))
            raise AssertionError("failing on purpose, midway")
    """)
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            str(test_file),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LAB "))
    name = line.split()[1]
    assert "client" in line
    assert leftovers(name) == []


def test_status_of_a_missing_lab():
    out = veil("lab", "status", "--name", "nosuchlab", check=False)
    assert out.returncode == 1 and "not up" in out.stderr
    assert (
        json.loads(
            veil("lab", "status", "--name", "nosuchlab", "-o", "json", check=False).stdout or "{}"
        )
        == {}
    )


def test_check_reports_this_machine_ready_for_everything():
    out = veil("check")
    assert "lab: ready" in out.stdout and "iptables capture: ready" in out.stdout
    assert "eBPF capture: ready" in out.stdout  # bcc really compiled and loaded a program


@pytest.mark.parametrize("mode", SOURCE_MODES)
def test_a_larger_pod_range_per_node(mode):
    """`--node-cidr-mask-size 22`: each node's pods in its own /22 of 10.244.0.0/16 (room for
    1013 a node), routed across nodes and through the mesh in both lab modes, and an agent
    restarted by the lab keeps the node's range."""
    name = new_lab_name()
    flags = ["--kubernetes"] if mode == "kubernetes" else []
    try:
        veil("lab", "up", "-f", MESH, "--name", name, "--node-cidr-mask-size", "22", *flags,
             timeout=300)  # fmt: skip
        st = json.loads(veil("lab", "status", "--name", name, "-o", "json").stdout)
        ranges = {"node1": IPv4Network("10.244.4.0/22"), "node2": IPv4Network("10.244.8.0/22")}
        assert {n["name"]: n["podCIDR"] for n in st["nodes"]} == {
            k: str(v) for k, v in ranges.items()
        }
        for p in st["pods"]:
            assert IPv4Address(p["ip"]) in ranges[p["node"]], p
        server_b = pod_of(st, "server-b")
        answer = curl_json(name, "client", f"http://{server_b['ip']}:8080/", ns="mesh")
        assert answer["pod"] == "server-b"
        assert answer["client"].split(":")[0] == pod_of(st, "client")["ip"]
        assert enrolled(name, "node2") == {"mesh/server-b"}
        if mode == "manifests":
            veil("lab", "agent", "stop", "--name", name, "node1")
            veil("lab", "agent", "start", "--name", name, "node1")
            answer = curl_json(name, "client", f"http://{server_b['ip']}:8080/", ns="mesh")
            assert answer["pod"] == "server-b"
    finally:
        veil("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []


def test_more_pods_than_a_node_range_holds_is_refused_before_anything_is_made(tmp_path):
    pods = "".join(
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  nodeName: node1\n"
        "  containers: [{name: c, image: busybox, command: [sleep, infinity]}]\n"
        for i in range(20)
    )
    (tmp_path / "pods.yaml").write_text(pods)
    name = new_lab_name()
    out = veil("lab", "up", "-f", str(tmp_path), "--name", name, "--node-cidr-mask-size", "28",
               check=False)  # fmt: skip
    assert out.returncode != 0
    assert "node1 would hold 20 pods, but its pod range 10.244.0.16/28 has room for 5" in out.stderr
    assert "--node-cidr-mask-size" in out.stderr
    assert leftovers(name) == []
