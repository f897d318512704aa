"""The waypoint on a real lab: HTTPRoute routing through `veil waypoint`, no bypass, TCP,
telemetry. Real clients: curl (HTTP/1.1) from a captured pod, through the pod's agent, over
HBONE to the waypoint, and over HBONE again to the chosen pod."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lab import netns, store
from tests.integration.conftest import lab_exec, leftovers, new_lab_name, veil

WAYPOINT = str(Path(__file__).parent / "waypoint")


@pytest.fixture(scope="module")
def wlab() -> Iterator[str]:
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", WAYPOINT, "--name", name)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []


def curl(
    lab: str, *args: str, pod: str = "client", ns: str = "web"
) -> subprocess.CompletedProcess[str]:
    return lab_exec(lab, pod, "curl", "-sS", "--max-time", "10", *args, ns=ns, check=False)


def answers(out: str) -> list[dict[str, Any]]:
    """The echo server's JSON answers in curl's output (several URLs in one run)."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while (i := out.find("{", i)) >= 0:
        doc, end = dec.raw_decode(out, i)
        docs.append(doc)
        i = end
    return docs


def test_the_waypoint_runs_as_its_own_identity_with_a_mesh_certificate(wlab):
    audit = (store.lab_dir(wlab) / "logs" / "ca.log").read_text()
    assert '"identity": "spiffe://cluster.local/ns/web/sa/waypoint"' in audit
    log = (store.lab_dir(wlab) / "logs" / "web_waypoint-0_waypoint.log").read_text()
    assert "up as spiffe://cluster.local/ns/web/sa/waypoint" in log


def test_a_90_10_split_over_2000_requests(wlab):
    out = curl(wlab, "http://catalog:9080/[1-2000]").stdout
    pods = [a["pod"] for a in answers(out)]
    assert len(pods) == 2000
    share = sum(p.startswith("catalog-v2") for p in pods) / 2000
    assert abs(share - 0.10) < 0.03, share
    # the rule's RequestHeaderModifier reached the app; the app saw the waypoint's address
    first = answers(out)[0]
    assert first["headers"]["x-via"] == "waypoint"


def test_a_header_match_routes_and_the_response_header_modifier_applies(wlab):
    out = curl(wlab, "-i", "-H", "x-canary: yes", "http://catalog:9080/[1-20]").stdout
    assert {a["pod"] for a in answers(out)} == {"catalog-v2-0"}
    assert out.count("x-route: canary-header") == 20


def test_bodies_stream_both_ways(wlab, tmp_path):
    body = tmp_path / "body"
    body.write_bytes(b"x" * (3 * 1024 * 1024))
    out = curl(wlab, "--data-binary", f"@{body}", "http://catalog:9080/upload").stdout
    assert answers(out)[0]["bodyBytes"] == 3 * 1024 * 1024
    chunked = curl(
        wlab,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{body}",
        "http://catalog:9080/",
    ).stdout
    assert answers(chunked)[0]["bodyBytes"] == 3 * 1024 * 1024


def test_trace_context_is_propagated_with_a_new_span(wlab):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    got = answers(curl(wlab, "-H", f"traceparent: {parent}", "http://catalog:9080/").stdout)[0]
    trace = got["headers"]["traceparent"]
    assert trace.startswith("00-0af7651916cd43dd8448eb211c80319c-") and trace != parent
    fresh = answers(curl(wlab, "http://catalog:9080/").stdout)[0]["headers"]["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", fresh)


def test_bypassing_the_waypoint_is_refused(wlab):
    st = json.loads(veil("lab", "status", "--name", wlab, "-o", "json").stdout)
    v1 = next(p["ip"] for p in st["pods"] if p["name"] == "catalog-v1-0")
    direct = curl(wlab, f"http://{v1}:9080/")  # a mesh client straight to the pod
    assert direct.returncode in (7, 52, 56), direct
    plain = curl(wlab, "http://catalog.web:9080/", pod="legacy", ns="plain")  # not in the mesh
    assert plain.returncode in (7, 52, 56), plain
    logs = "".join(
        (store.lab_dir(wlab) / "logs" / f"agent-{n}.log").read_text() for n in ("node1", "node2")
    )
    assert "waypoint bypass: traffic to web/catalog-v1-0 must come through web/waypoint" in logs


def test_other_tcp_goes_through_the_waypoint_as_tcp(wlab):
    out = lab_exec(
        wlab,
        "client",
        "sh",
        "-c",
        "printf 'not http\\r\\n\\r\\n' | curl -sS --max-time 5 telnet://catalog:9080",
        ns="web",
        check=False,
    ).stdout
    assert "illegal request line" in out  # the app's own answer to bytes h11 could not parse


def test_request_metrics_and_access_log(wlab):
    curl(wlab, "http://catalog:9080/[1-5]")
    ns = f"veil-{wlab}-web_waypoint-0"
    body = netns.run(netns.nsenter_argv(ns, ["curl", "-s", "127.0.0.1:15020/metrics"])).stdout
    line = next(
        ln
        for ln in body.splitlines()
        if ln.startswith("istio_requests_total{")
        and 'response_code="200"' in ln
        and 'destination_workload="catalog-v1"' in ln
    )
    assert 'reporter="waypoint"' in line and 'source_workload="client"' in line
    assert 'source_principal="spiffe://cluster.local/ns/web/sa/client"' in line
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert "istio_request_duration_milliseconds_bucket{" in body
    log = (store.lab_dir(wlab) / "logs" / "web_waypoint-0_waypoint.log").read_text()
    entry = json.loads(log.strip().splitlines()[-1].split("veil.access: ", 1)[1])
    assert entry["route"] == "web/catalog" and entry["response_code"] == 200
