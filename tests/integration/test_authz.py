"""L4 authorization on a real lab: applied at runtime, enforced on 15008 (401) and 15006."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.holders import DENY_CLIENT, HOLD_IDLE, POLICY, apply, ended, holding
from tests.support.lab import kubernetes_mode, lab_exec, metric, veil
from tests.support.logs import access_entries, wait_for_access
from veil.lab import controlplane
from veil.runtime.telemetry.accesslog import FLUSH_INTERVAL


def code(lab: str, pod: str, url: str, ns: str) -> int:
    return lab_exec(
        lab, pod, "curl", "-s", "-o", "/dev/null", "--max-time", "5", url, ns=ns, check=False
    ).returncode


RESET = (7, 52, 56)


def test_deny_allow_invalid_and_delete(lab, pods, tmp_path):
    b = f"http://{pods['server-b']['ip']}:8080/"
    assert code(lab, "client", b, "mesh") == 0
    denied_before = metric(lab, "node2", "veil_authz_denied_total")
    # DENY the client's principal: HBONE answers 401, curl sees the connection fail.
    apply(
        lab,
        tmp_path,
        DENY_CLIENT,
    )
    assert code(lab, "client", b, "mesh") != 0
    assert (
        metric(lab, "node2", "veil_authz_denied_total", policy="mesh/server-policy")
        >= denied_before + 1
    )
    log = (Path(f"/run/veil/lab/{lab}/logs/agent-node2.log")).read_text()
    assert "policy mesh/server-policy: a DENY rule matches" in log
    # ALLOW only the client on app=server: the client passes, plaintext from `plain` is reset.
    apply(
        lab,
        tmp_path,
        POLICY.format(
            spec="""  selector: {matchLabels: {app: server}}
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]"""
        ),
    )
    assert code(lab, "client", b, "mesh") == 0
    # Reset right after accept: curl sees it as a failed connect (7) when the reset beats its
    # check of the handshake, else as an empty reply or a failed read.
    assert code(lab, "legacy", "http://server.mesh/", "plain") in RESET
    # A bad edit keeps the previous version in force, and says why (on Kubernetes the CRD's
    # schema refuses it first: the API keeps the previous version).
    bad = POLICY.format(spec="""  rules: [{from: [{source: {ipBlocks: [nope]}}]}]""")
    if kubernetes_mode(lab):
        (tmp_path / "bad.yaml").write_text(bad)
        out = veil("lab", "apply", "--name", lab, "-f", str(tmp_path / "bad.yaml"), check=False)
        assert out.returncode == 1 and "should match" in out.stderr, out.stderr
        bad = POLICY.format(spec="""  rules: [{from: [{source: {ipBlocks: [999.1.1.1]}}]}]""")
    apply(lab, tmp_path, bad)
    assert code(lab, "client", b, "mesh") == 0
    assert code(lab, "legacy", "http://server.mesh/", "plain") in RESET
    _, body = controlplane.agent_get(f"veil-{lab}-node2", "/config_dump")
    errors = json.loads(body)["policies"]["errors"]
    assert "spec.rules[0].from[0].source.ipBlocks" in errors["mesh/server-policy"]
    # Deleting the policy opens the workload again (no ALLOW policy left).
    veil("lab", "delete", "--name", lab, "authorizationpolicy", "server-policy", "-n", "mesh")
    time.sleep(1.0)
    assert code(lab, "legacy", "http://server.mesh/", "plain") == 0


def test_apply_refuses_what_the_lab_runs(lab, tmp_path):
    if kubernetes_mode(lab):
        pytest.skip("manifest mode only: on Kubernetes `lab apply` is kubectl apply, any kind")
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"
        "spec: {containers: [{name: c, command: [sleep, '1']}]}\n"
    )
    out = veil("lab", "apply", "--name", lab, "-f", str(tmp_path / "pod.yaml"), check=False)
    assert out.returncode == 1 and "at `lab up` only" in out.stderr


def test_grafana_dashboard_uses_only_exported_metrics(lab):
    """Every metric the dashboard queries is one the agent or the CA really exports."""
    import re  # noqa: PLC0415

    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    from veil.lab import netns  # noqa: PLC0415

    dash = json.loads(
        (Path(__file__).parents[2] / "deploy" / "grafana" / "veil-dashboard.json").read_text()
    )
    wanted = {
        name
        for p in dash["panels"]
        for t in p["targets"]
        for name in re.findall(r"\b((?:istio|veil)_[a-z0-9_]+)", t["expr"])
    }
    _, agent_text = controlplane.agent_get(f"veil-{lab}-node2", "/metrics", 15020)
    ca_text = netns.run(
        netns.nsenter_argv(
            f"veil-{lab}-node1",
            ["curl", "-s", f"http://{controlplane.CA_IP}:{controlplane.CA_METRICS_PORT}/metrics"],
        )
    ).stdout
    families = [f for text in (agent_text, ca_text) for f in text_string_to_metric_families(text)]
    # A labelled counter with no child yet is declared (# TYPE) before it has samples.
    exported = {s.name for f in families for s in f.samples} | {
        f.name + ("_total" if f.type == "counter" else "") for f in families
    }
    assert wanted, "the dashboard queries nothing"
    assert wanted <= exported, sorted(wanted - exported)


def test_authz_check_agrees_with_the_data_plane(lab, pods, tmp_path):
    b = f"{pods['server-b']['ip']}:8080"
    apply(
        lab,
        tmp_path,
        POLICY.format(
            spec="""  selector: {matchLabels: {app: server}}
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]"""
        ),
    )
    try:
        ok = veil("authz", "check", "--name", lab, "--from", "client", "-n", "mesh", "--to", b)
        assert "ALLOW by policy mesh/server-policy" in ok.stdout
        assert code(lab, "client", f"http://{b}/", "mesh") == 0
        no = veil(
            "authz",
            "check",
            "--name",
            lab,
            "--from",
            "legacy",
            "-n",
            "plain",
            "--to",
            "server.mesh:80",
            check=False,
        )
        assert no.returncode == 3
        assert no.stdout.count("DENY") == 2  # both endpoints of the service, plaintext
        assert "plaintext, no identity" in no.stdout
        assert code(lab, "legacy", "http://server.mesh/", "plain") != 0
        opt = veil(
            "authz",
            "check",
            "--name",
            lab,
            "--from",
            "client",
            "-n",
            "mesh",
            "--to",
            f"{pods['optout']['ip']}:8080",
        )
        assert "not in the mesh" in opt.stdout
    finally:
        veil("lab", "delete", "--name", lab, "authorizationpolicy", "server-policy", "-n", "mesh")


def test_status_shows_every_node(lab):
    out = veil("status", "--name", lab)
    assert "node1: agent ready; 2 pods enrolled" in out.stdout
    assert "node2: agent ready; 1 pods enrolled" in out.stdout
    assert "identity   spiffe://cluster.local/ns/mesh/sa/client" in out.stdout


def test_denials_reach_the_access_log_and_logging_level_changes_at_runtime(lab, pods, tmp_path):
    apply(
        lab,
        tmp_path,
        POLICY.format(
            spec="""  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]"""
        ),
    )
    log = Path(f"/run/veil/lab/{lab}/logs/agent-node1.log")

    def denials(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in entries if e["decision"] == "deny"]

    try:
        time.sleep(3 * FLUSH_INTERVAL)  # earlier tests' lines are all written
        before = len(denials(access_entries(log)))
        assert code(lab, "legacy", f"http://{pods['server-a']['ip']}:8080/", "plain") != 0
        denied = denials(wait_for_access(log, lambda es: len(denials(es)) > before))[before:]
        assert denied[-1]["policy"] == "mesh/server-policy"
        assert denied[-1]["path"] == "plaintext" and denied[-1]["src_workload"] == "legacy"
    finally:
        veil("lab", "delete", "--name", lab, "authorizationpolicy", "server-policy", "-n", "mesh")
    ns = f"veil-{lab}-node1"
    assert json.loads(controlplane.agent_get(ns, "/logging?level=debug")[1]) == {"level": "debug"}
    assert json.loads(controlplane.agent_get(ns, "/logging")[1]) == {"level": "debug"}
    assert controlplane.agent_get(ns, "/logging?level=loud")[0] == 400
    controlplane.agent_get(ns, "/logging?level=info")


def test_a_policy_change_closes_open_connections_it_now_denies(lab, pods, tmp_path):
    """Issue 23.6 (as ztunnel): an open connection is judged again when the policies change."""
    try:
        with holding(lab, HOLD_IDLE, pods["server-b"]["ip"]) as holder:
            time.sleep(0.5)  # the CONNECT has reached server-b's agent
            apply(lab, tmp_path, DENY_CLIENT)
            assert ended(holder) == "reset"  # cut at both ends, never a clean end
        log = Path(f"/run/veil/lab/{lab}/logs/agent-node2.log")
        entries = wait_for_access(
            log,
            lambda es: any("closed after a policy change" in (e.get("error") or "") for e in es),
        )
        closed = next(
            e for e in entries if "closed after a policy change" in (e.get("error") or "")
        )
        assert closed["response_flags"] == "RBAC"
    finally:
        veil("lab", "delete", "--name", lab, "authorizationpolicy", "server-policy", "-n", "mesh")
        time.sleep(1.0)
