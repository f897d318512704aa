"""Operator commands: `veil status` (what each node's agent is doing) and `veil authz check`
(what the live policy set decides for a connection, and why). Today they read a lab; on
Kubernetes they will read the same things through the API and the agents' admin ports.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from veil.core.authz import Decision, Facts, decide
from veil.core.grammar import port_number
from veil.core.state import MeshState, Workload, build_state
from veil.lab import controlplane, store
from veil.lab.errors import LabError
from veil.runtime.sources.jwks import fetch_jwks

TD = "cluster.local"


# What the state source watches, as kubectl names the kinds (kubernetes mode).
API_KINDS = (
    "namespaces,pods,services,gateways.gateway.networking.k8s.io,"
    "httproutes.gateway.networking.k8s.io,grpcroutes.gateway.networking.k8s.io,"
    "tcproutes.gateway.networking.k8s.io,"
    "referencegrants.gateway.networking.k8s.io,"
    "authorizationpolicies.security.veil.dev,requestauthentications.security.veil.dev,"
    "trafficpolicies.traffic.veil.dev"
)


def cluster_state(lab: str) -> MeshState:
    """The state the agents hold: from the state directory, or in kubernetes mode from the
    API server (one list of every kind the source watches)."""
    record = store.read_record(lab)
    if record is None:
        raise LabError(f"lab {lab!r} is not up")
    if record.get("kubernetes"):
        from veil.lab import kubernetes as k8s  # noqa: PLC0415

        items = json.loads(k8s.kubectl(lab, "get", API_KINDS, "-A", "-o", "json"))["items"]
        mesh = k8s.kubectl(  # the mesh config, if there is one
            lab, "get", "configmap", "-n", "veil-system", "--field-selector",
            "metadata.name=veil-mesh", "-o", "json",
        )  # fmt: skip
        items += [{**o, "kind": "ConfigMap"} for o in json.loads(mesh)["items"]]
        return build_state(items, 0, fetch_jwks)
    return build_state(store.read_objects(store.state_dir(lab)), 0, fetch_jwks)


def status(lab: str) -> list[dict[str, Any]]:
    record = store.read_record(lab)
    if record is None:
        raise LabError(f"lab {lab!r} is not up")
    nodes = []
    for node in record.get("nodes", []):
        code, ready = controlplane.agent_get(node["netns"], "/healthz/ready", 15021)
        entry: dict[str, Any] = {
            "node": node["name"],
            "agent": "down",
            "enrolled": [],
            "tunnels": {},
            "certificates": [],
        }
        dump_code, body = controlplane.agent_get(node["netns"], "/config_dump")
        if dump_code == 200:
            dump = json.loads(body)
            entry.update(
                {
                    "agent": "ready" if code == 200 else f"not ready: {ready.strip()}",
                    "enrolled": [f"{e['namespace']}/{e['name']}" for e in dump["enrolled"]],
                    "tunnels": dump.get("tunnels", {}),
                    "certificates": [
                        {k: c.get(k) for k in ("identity", "state", "notAfter")}
                        for c in dump["certificates"]
                    ],
                    "policyErrors": dump.get("policies", {}).get("errors", {}),
                }
            )
        nodes.append(entry)
    return nodes


def _expires_in(not_after: str | None) -> str:
    if not not_after:
        return "-"
    left = datetime.datetime.fromisoformat(not_after) - datetime.datetime.now(datetime.UTC)
    seconds = int(left.total_seconds())
    if seconds < 0:
        return "expired"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(nodes: list[dict[str, Any]]) -> str:
    lines = []
    for n in nodes:
        t = n["tunnels"]
        lines.append(
            f"{n['node']}: agent {n['agent']}; {len(n['enrolled'])} pods enrolled; "
            f"HBONE tunnels {t.get('outbound', 0)} out, {t.get('inbound', 0)} in"
        )
        for pod in n["enrolled"]:
            lines.append(f"  enrolled   {pod}")
        for c in n["certificates"]:
            lines.append(
                f"  identity   {c['identity']:<52} {c['state']:<8} expires in "
                f"{_expires_in(c.get('notAfter'))}"
            )
        for ref, err in n.get("policyErrors", {}).items():
            lines.append(f"  POLICY ERROR {ref}: {err}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    destination: Workload
    port: int
    enforced: bool
    mtls: bool
    decision: Decision


def _resolve(state: MeshState, target: str, src_ns: str) -> tuple[list[tuple[Workload, int]], str]:
    host, _, port_s = target.rpartition(":")
    port = port_number(port_s)
    if port is None:
        raise LabError(f"--to {target!r}: expected <service|pod|ip>:<port>")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        ip = ""
    if ip:
        hit = state.services_by_vip.get((ip, port))
        if hit is not None:
            return state.endpoints(*hit), f"service {hit[0].namespace}/{hit[0].name}"
        w = state.workloads_by_ip.get(ip)
        if w is None:
            raise LabError(f"no pod or service has address {ip}")
        return [(w, port)], f"pod {w.key}"
    name, _, ns = host.partition(".")
    ns = ns.split(".")[0] if ns else src_ns
    for s in state.services:
        if s.name == name and s.namespace == ns:
            sport = next((p for p in s.ports if p.port == port), None)
            if sport is None:
                raise LabError(f"service {ns}/{name} has no port {port}")
            return state.endpoints(s, sport), f"service {ns}/{name}"
    w = state.workload(ns, name)
    if w is None:
        raise LabError(f"no service or pod {ns}/{name}")
    return [(w, port)], f"pod {w.key}"


def authz_check(lab: str, src_pod: str, src_ns: str, target: str) -> tuple[str, list[Verdict]]:
    state = cluster_state(lab)
    src = state.workload(src_ns, src_pod)
    if src is None:
        raise LabError(f"no pod {src_ns}/{src_pod}")
    policies = state.policies
    endpoints, what = _resolve(state, target, src_ns)
    verdicts = []
    for w, port in endpoints:
        mtls = state.in_mesh(src) and state.in_mesh(w)
        facts = Facts(
            source_ip=src.ip or "0.0.0.0",
            destination_ip=w.ip or "0.0.0.0",
            destination_port=port,
            principal=src.identity(TD).istio_principal if mtls else None,
            destination_labels=w.labels,
            destination_namespace=w.namespace,
        )
        verdicts.append(
            Verdict(w, port, state.in_mesh(w), mtls, decide(policies.policies.values(), facts))
        )
    return what, verdicts


def format_check(src: str, what: str, verdicts: list[Verdict]) -> str:
    if not verdicts:
        return f"{src} -> {what}: no ready endpoint, the connection is refused"
    lines = []
    for v in verdicts:
        to = f"{v.destination.key} ({v.destination.ip}:{v.port})"
        if not v.enforced:
            lines.append(f"{src} -> {to}: ALLOW (not in the mesh: no policy is enforced)")
            continue
        verdict = "ALLOW" if v.decision.allowed else "DENY"
        how = "mTLS as its identity" if v.mtls else "plaintext, no identity"
        by = f"policy {v.decision.policy}" if v.decision.policy else "no policy"
        lines.append(f"{src} -> {to} [{how}]: {verdict} by {by}: {v.decision.reason}")
        if v.decision.audited:
            lines.append(f"  audited by {', '.join(v.decision.audited)}")
    return "\n".join(lines)
