"""Mesh identity on a real lab: `veil ca` in its netns, an agent per node, curl and openssl
as peers no one here wrote."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.lab import SHOP, ca_post, new_lab_name, veil
from tests.support.pki import intermediate_plugin
from veil.core.certs import pem
from veil.core.csr import build_csr, new_key
from veil.core.spiffe import SpiffeId
from veil.lab import controlplane, store

TD = "cluster.local"


def config_dump(lab: str, node: str) -> dict[str, Any]:
    code, body = controlplane.agent_get(f"veil-{lab}-{node}", "/config_dump")
    assert code == 200, body
    dump: dict[str, Any] = json.loads(body)
    return dump


def scheduled_identities(lab: str, node: str) -> set[str]:
    out = set()
    for f in (store.state_dir(lab) / "pods").rglob("*.yaml"):
        pod = yaml.safe_load(f.read_text())
        if pod["spec"]["nodeName"] == node:
            out.add(
                str(SpiffeId(TD, pod["metadata"]["namespace"], pod["spec"]["serviceAccountName"]))
            )
    return out


def openssl_verify(tmp: Path, bundle: str, chain: list[str]) -> subprocess.CompletedProcess[str]:
    (tmp / "bundle.pem").write_text(bundle)
    (tmp / "leaf.pem").write_text(chain[0])
    (tmp / "untrusted.pem").write_text("".join(chain[1:]))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp / "bundle.pem"),
            "-untrusted",
            str(tmp / "untrusted.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_each_agent_holds_exactly_its_nodes_identities(shop_lab, tmp_path):
    bundle = (controlplane.node_dir(shop_lab, "node1") / "ca-root.pem").read_text()
    for node in ("node1", "node2"):
        dump = config_dump(shop_lab, node)
        held = {c["identity"]: c for c in dump["certificates"]}
        assert set(held) == scheduled_identities(shop_lab, node)
        for cert in held.values():
            assert cert["state"] == "valid"
            out = openssl_verify(tmp_path, bundle, cert["certChain"])
            assert out.returncode == 0, out.stdout + out.stderr
        assert "PRIVATE KEY" not in json.dumps(dump)
        # The agent serving alone describes itself as a worker does (one entry, same fields).
        (alone,) = dump["workers"]["processes"]
        assert set(alone) == {"index", "pid", "connections", "active", "snapshot", "certificates"}
        assert alone["snapshot"] == dump["snapshot"]["version"]
        assert alone["certificates"] == len(held)
        code, body = controlplane.agent_get(f"veil-{shop_lab}-{node}", "/healthz/ready", 15021)
        assert (code, body.strip()) == (200, "ready")


def test_secrets_on_disk_are_private(shop_lab):
    for path in (
        controlplane.ca_dir(shop_lab) / "ca-key.pem",
        controlplane.ca_dir(shop_lab) / "bootstrap-tokens.yaml",
        controlplane.node_dir(shop_lab, "node1") / "bootstrap-token",
    ):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert "BEGIN" not in (store.lab_dir(shop_lab) / "logs" / "ca.log").read_text()


def test_the_ca_signs_only_identities_on_the_asking_node(shop_lab, tmp_path):
    orders = SpiffeId(TD, "backoffice", "orders")  # orders-0 runs on node2 only
    request = {"identity": str(orders), "csr": build_csr(new_key(), orders).decode()}
    status, doc = ca_post(shop_lab, "node1", request)
    assert (status, doc["code"]) == (403, "not_on_node")
    assert "node node1 may not obtain" in doc["error"] and "runs on node2" in doc["error"]
    status, doc = ca_post(shop_lab, "node2", request)
    assert status == 200, doc
    bundle = (controlplane.node_dir(shop_lab, "node2") / "ca-root.pem").read_text()
    assert openssl_verify(tmp_path, bundle, doc["certChain"]).returncode == 0
    status, doc = ca_post(shop_lab, "node2", request, token="not-a-token")
    assert (status, doc["code"]) == (401, "unknown_credential")
    status, doc = ca_post(shop_lab, "node2", {"identity": str(orders), "csr": "garbage"})
    assert (status, doc["code"]) == (400, "bad_csr")
    audit = (store.lab_dir(shop_lab) / "logs" / "ca.log").read_text()
    assert '"code": "unknown_credential"' in audit and '"code": "bad_csr"' in audit


def test_certificates_rotate_before_expiry_on_the_lab():
    """A 6 s TTL: every agent must renew at half life and stay ready throughout."""
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", SHOP, "--name", name, "--cert-ttl", "6")
        certs = config_dump(name, "node1")["certificates"]
        first = {c["identity"]: c["serial"] for c in certs}
        for c in certs:  # the TTL really is 6 s (plus the minute leaves are back-dated by)
            lifetime = datetime.datetime.fromisoformat(
                c["notAfter"]
            ) - datetime.datetime.fromisoformat(c["notBefore"])
            assert lifetime == datetime.timedelta(seconds=66)
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:
            for node in ("node1", "node2"):
                code, body = controlplane.agent_get(f"veil-{name}-{node}", "/healthz/ready", 15021)
                assert code == 200, body
            time.sleep(0.5)
        later = {c["identity"]: c["serial"] for c in config_dump(name, "node1")["certificates"]}
        assert set(later) == set(first)
        assert all(later[i] != first[i] for i in first)  # every identity renewed
    finally:
        veil("lab", "down", "--name", name, check=False)


def ca_argv(tmp_path: Path, *extra: str) -> list[str]:
    """`veil ca` on loopback with its state, data and node tokens under tmp_path."""
    return [
        str(Path(sys.executable).parent / "veil"),
        "ca",
        "--state-dir",
        str(tmp_path / "state"),
        "--data-dir",
        str(tmp_path / "ca"),
        "--node-tokens",
        str(tmp_path / "tokens.yaml"),
        "--listen",
        "127.0.0.1:0",
        *extra,
    ]


@pytest.fixture
def local_ca(tmp_path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `veil ca` processes on loopback (no lab needed); stop them all afterwards."""
    procs: list[subprocess.Popen[str]] = []
    (tmp_path / "state").mkdir()
    (tmp_path / "tokens.yaml").write_text("tokens: []\n")

    def start(*extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ca_argv(tmp_path, "--metrics-listen", "127.0.0.1:0", *extra),
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stderr is not None
        deadline = time.monotonic() + 15
        for line in proc.stderr:
            if "ca: serving" in line:
                return proc
            assert time.monotonic() < deadline, "veil ca did not start"
        raise AssertionError(f"veil ca exited with {proc.wait()}")

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def test_ca_restart_keeps_the_same_root(local_ca, tmp_path):
    first = local_ca()
    root = (tmp_path / "ca" / "root-cert.pem").read_text()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=5) == 0
    local_ca()
    assert (tmp_path / "ca" / "root-cert.pem").read_text() == root
    assert (tmp_path / "ca" / "trust-bundle.pem").read_text() == root


def test_ca_with_an_operator_intermediate_serves_the_operator_root(local_ca, tmp_path):
    operator_root = intermediate_plugin(tmp_path / "plugin")
    local_ca("--plugin-certs", str(tmp_path / "plugin"))
    bundle = (tmp_path / "ca" / "trust-bundle.pem").read_text()
    assert bundle == pem(operator_root.cert)
    assert not (tmp_path / "ca" / "ca-key.pem").exists()  # the operator's key is not copied


def test_ca_refuses_to_start_on_broken_plugin_files(tmp_path):
    intermediate_plugin(tmp_path / "plugin")
    (tmp_path / "plugin" / "ca-key.pem").write_text("junk")
    (tmp_path / "state").mkdir()
    out = subprocess.run(
        ca_argv(tmp_path, "--plugin-certs", str(tmp_path / "plugin")),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 1
    assert "ca-key.pem: not an unencrypted PEM private key" in out.stderr
