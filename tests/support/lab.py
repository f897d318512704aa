"""Running the real lab from tests: the `veil` command, exec in pods, metrics, and the lab
fixtures (integration and interop conftests import these).

Every lab a test brings up has a unique name (`it` + 6 hex digits) and is removed in a
`finally`, also when the test fails; the session ends by removing any lab that still exists.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from veil.lab import controlplane, netns, procfs, store, upstream
from veil.lab import lab as labmod

TD = "cluster.local"  # the lab's trust domain
ROOT = Path(__file__).parents[2]
VEIL = str(Path(sys.executable).parent / "veil")
SHOP = str(ROOT / "examples" / "shop")
EXTRA = str(ROOT / "tests" / "integration" / "manifests")


def veil(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # errors="replace": a command may print binary (openssl s_client shows the server's
    # HTTP/2 SETTINGS when they arrive first); the tests read text around it.
    proc = subprocess.run(
        [VEIL, *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"veil {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def lab_exec(
    lab: str, pod: str, *argv: str, ns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return veil(
        "lab", "exec", "--name", lab, *(["-n", ns] if ns else []), pod, "--", *argv, check=check
    )


def curl_json(lab: str, pod: str, url: str, ns: str | None = None) -> dict[str, Any]:
    out = lab_exec(lab, pod, "curl", "-sS", "--max-time", "5", url, ns=ns).stdout
    answer: dict[str, Any] = json.loads(out)
    return answer


def new_lab_name() -> str:
    return f"it{secrets.token_hex(3)}"


def leftovers(lab: str) -> list[str]:
    found = labmod.leftovers(lab)
    found += [n for n in netns.listing() if n.startswith(labmod.netns_prefix(lab))]
    return found


def alive(pid: int) -> bool:
    return procfs.running(pid)


def kubernetes_mode(lab: str) -> bool:
    return bool((store.read_record(lab) or {}).get("kubernetes"))


def capture_mode(lab: str, node: str = "node1") -> str:
    record = store.read_record(lab) or {}
    mode: str = next(n["capture"] for n in record["nodes"] if n["name"] == node)
    return mode


def lab_pids(lab: str) -> list[int]:
    record = store.read_record(lab) or {}
    return [pid for p in record.get("pods", []) for pid in p.get("pids", [])]


@pytest.fixture(scope="module")
def shop_lab() -> Iterator[str]:
    """examples/shop (plus tests/integration/manifests) on two nodes."""
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", SHOP, "-f", EXTRA, "--name", name)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)


MESH = str(ROOT / "tests" / "integration" / "mesh")


@pytest.fixture(scope="module")
def kube_lab() -> Iterator[str]:
    """tests/integration/mesh on the kubernetes-mode lab (the real control plane, the lab as
    kubelet, Veil's daemons reading the API)."""
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", MESH, "--name", name, "--kubernetes", timeout=300)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False, timeout=120)
    assert leftovers(name) == []


LAB_MODES = [
    "iptables",
    "ebpf",
    pytest.param(
        "kubernetes",
        marks=pytest.mark.skipif(
            bool(upstream.missing()), reason="the upstream binaries are not built"
        ),
    ),
]


# Manifest mode and the real control plane (for suites whose subject is not capture).
SOURCE_MODES = [
    "manifests",
    pytest.param(
        "kubernetes",
        marks=pytest.mark.skipif(
            bool(upstream.missing()), reason="the upstream binaries are not built"
        ),
    ),
]


def lab_from(manifests: str, mode: str) -> Iterator[str]:
    """A lab of `manifests` in one of SOURCE_MODES, for a module fixture: down (and nothing
    left) after the module, whatever happened."""
    name = new_lab_name()
    flags = ["--kubernetes"] if mode == "kubernetes" else []
    try:
        veil("lab", "up", "-f", manifests, "--name", name, *flags, timeout=300)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []


@pytest.fixture(scope="module", params=LAB_MODES)
def lab(request: pytest.FixtureRequest) -> Iterator[str]:
    """tests/integration/mesh: namespace `mesh` enrolled from the start, `plain` not; every
    test on it runs once per capture mode in manifest mode, and once on the real Kubernetes
    control plane (iptables capture; the manifests applied with kubectl, the pods run by the
    lab's kubelets, Veil reading the API)."""
    name = new_lab_name()
    mode = ["--kubernetes"] if request.param == "kubernetes" else ["--capture", request.param]
    try:
        veil("lab", "up", "-f", MESH, "--name", name, *mode, timeout=300)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []  # incl. pinned eBPF maps


@pytest.fixture(scope="module")
def pods(lab: str) -> dict[str, dict[str, Any]]:
    """The mesh lab's pods by name (namespace, name, ip, node, phase)."""
    st = json.loads(veil("lab", "status", "--name", lab, "-o", "json").stdout)
    return {p["name"]: p for p in st["pods"]}


@pytest.fixture
def lab_status(shop_lab: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(
        veil("lab", "status", "--name", shop_lab, "-o", "json").stdout
    )
    return status


@pytest.fixture(scope="session", autouse=True)
def _remove_test_labs() -> Iterator[None]:
    yield
    names = {n.split("-")[1] for n in netns.listing() if n.startswith("veil-it")}
    names |= {n for n in store.labs() if n.startswith("it")}
    for name in names:
        labmod.down(name, log=lambda _m: None)


def ca_post(
    lab: str, node: str, body: dict[str, Any], token: str | None = None
) -> tuple[int, dict[str, Any]]:
    return controlplane.ca_request(lab, node, body, token)


def enrolled(lab: str, node: str) -> set[str]:
    """The pods a node's agent has captured (its admin /config_dump)."""
    code, body = controlplane.agent_get(f"veil-{lab}-{node}", "/config_dump")
    assert code == 200, body
    return {f"{e['namespace']}/{e['name']}" for e in json.loads(body)["enrolled"]}


def metric(lab: str, node: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    code, body = controlplane.agent_get(f"veil-{lab}-{node}", "/metrics", 15020)
    assert code == 200, body
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
