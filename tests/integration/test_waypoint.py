"""The waypoint on a real lab: HTTPRoute routing through `veil waypoint`, no bypass, TCP,
telemetry. Real clients: curl (HTTP/1.1) from a captured pod, through the pod's agent, over
HBONE to the waypoint, and over HBONE again to the chosen pod. Every test runs in both lab
modes: manifest mode (the lab runs waypoint pod `<gateway>-0`) and kubernetes mode (the
controller makes the waypoint Deployment, the kubelets run it)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import SOURCE_MODES, lab_exec, lab_from, veil
from tests.support.logs import access_entries, wait_for_access
from veil.lab import lab as labmod
from veil.lab import netns, store
from veil.runtime.telemetry.accesslog import FLUSH_INTERVAL

WAYPOINT = str(Path(__file__).parent / "waypoint")


@pytest.fixture(scope="module", params=SOURCE_MODES)
def wlab(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from lab_from(WAYPOINT, request.param)


def pod_name(lab: str, workload: str, ns: str = "web") -> str:
    """A workload's (first) pod: `<deployment>-0` in manifest mode, the ReplicaSet's pod on
    Kubernetes; a bare pod by its name."""
    return str(labmod.find_pod(lab, f"deploy/{workload}", ns)["name"])


def is_pod_of(name: str, workload: str) -> bool:
    """`catalog-v2-0` (manifest mode) or `catalog-v2-7d9f8c6b5-x2x4z` (Kubernetes)."""
    return re.fullmatch(rf"{re.escape(workload)}-(\d+|[0-9a-z]+-[0-9a-z]{{5}})", name) is not None


def waypoint_log(lab: str, gateway: str = "waypoint") -> Path:
    return store.lab_dir(lab) / "logs" / f"web_{pod_name(lab, gateway)}_waypoint.log"


def waypoint_netns(lab: str, gateway: str = "waypoint") -> str:
    return str(labmod.find_pod(lab, f"deploy/{gateway}", "web")["netns"])


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
    log = waypoint_log(wlab).read_text()
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
    pods = {a["pod"] for a in answers(out)}
    assert len(pods) == 1 and is_pod_of(pods.pop(), "catalog-v2")
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
    v1_pod = pod_name(wlab, "catalog-v1")
    v1 = next(p["ip"] for p in st["pods"] if p["name"] == v1_pod)
    # a mesh client dialling the pod itself is sent through the waypoint by its agent
    direct = curl(wlab, f"http://{v1}:9080/")
    assert answers(direct.stdout)[0]["pod"] == v1_pod, direct
    to_pod = f"{v1}:9080"
    seen = wait_for_access(waypoint_log(wlab), lambda es: any(e["authority"] == to_pod for e in es))
    assert [e["response_code"] for e in seen if e["authority"] == to_pod] == [200]
    plain = curl(wlab, "http://catalog.web:9080/", pod="legacy", ns="plain")  # not in the mesh
    assert plain.returncode in (7, 52, 56), plain
    plain = curl(wlab, f"http://{v1}:9080/", pod="legacy", ns="plain")  # ... to the pod itself
    assert plain.returncode in (7, 52, 56), plain
    logs = "".join(
        (store.lab_dir(wlab) / "logs" / f"agent-{n}.log").read_text() for n in ("node1", "node2")
    )
    assert f"waypoint bypass: traffic to web/{v1_pod} must come through web/waypoint" in logs


def test_ingress_from_outside_the_mesh_goes_through_the_waypoint_when_asked(wlab, tmp_path):
    """`veil.dev/ingress-use-waypoint: "true"` (Istio's istio.io/ingress-use-waypoint): plaintext
    from outside the mesh (pod `legacy`, namespace `plain`) to a pod bound to the waypoint is
    carried there by the pod's agent instead of refused, judged as plaintext (no principal:
    a DENY on `notPrincipals: ["*"]` holds for it, not for mesh clients); without the label,
    refused again."""
    label = ["lab", "label", "--name", wlab, "ns", "web"]
    policy = tmp_path / "no-plaintext.yaml"
    policy.write_text(
        """apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-plaintext-admin, namespace: web}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}], to: [{operation: {paths: ["/admin"]}}]}]
"""
    )
    veil("lab", "apply", "--name", wlab, "-f", str(policy))
    veil(*label, "veil.dev/ingress-use-waypoint=true")
    try:
        deadline = time.monotonic() + 30
        while (
            plain := curl(wlab, "http://catalog.web:9080/ingress", pod="legacy", ns="plain")
        ).returncode:
            assert time.monotonic() < deadline, plain
            time.sleep(0.5)
        assert answers(plain.stdout)[0]["pod"].startswith("catalog-v"), plain.stdout
        seen = wait_for_access(
            waypoint_log(wlab), lambda es: any(e["path"] == "/ingress" for e in es)
        )
        entry = next(e for e in seen if e["path"] == "/ingress")
        assert entry["response_code"] == 200 and entry["source_principal"] == "unknown", entry
        admin = "http://catalog.web:9080/admin"
        out = curl(wlab, "-o", "/dev/null", "-w", "%{http_code}", admin, pod="legacy", ns="plain")
        assert out.stdout == "403", out
        assert codes(wlab, "http://catalog:9080/admin") == [200]  # a mesh client: not plaintext
    finally:
        veil(*label, "veil.dev/ingress-use-waypoint-")
        veil(
            "lab",
            "delete",
            "--name",
            wlab,
            "authorizationpolicy",
            "no-plaintext-admin",
            "-n",
            "web",
        )
    deadline = time.monotonic() + 30
    while curl(wlab, "http://catalog.web:9080/", pod="legacy", ns="plain").returncode == 0:
        assert time.monotonic() < deadline, "plaintext still passes without the label"
        time.sleep(0.5)


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
    body = netns.run(
        netns.nsenter_argv(waypoint_netns(wlab), ["curl", "-s", "127.0.0.1:15020/metrics"])
    ).stdout
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
    log = waypoint_log(wlab)
    entries = wait_for_access(log, lambda es: any(e["route"] == "web/catalog" for e in es))
    entry = [e for e in entries if e["route"] == "web/catalog"][-1]
    assert entry["response_code"] == 200


def codes(lab: str, url: str, *extra: str) -> list[int]:
    out = curl(lab, "-o", "/dev/null", "-w", "%{http_code}\\n", *extra, url).stdout
    return [int(c) for c in out.split()]


def access_log(lab: str) -> list[dict[str, Any]]:
    time.sleep(FLUSH_INTERVAL * 3)  # the waypoint writes its access log in batches
    return access_entries(waypoint_log(lab))


def waypoint_metrics(lab: str) -> str:
    ns = waypoint_netns(lab)
    return netns.run(netns.nsenter_argv(ns, ["curl", "-s", "127.0.0.1:15020/metrics"])).stdout


def test_timeouts_request_answers_504(wlab):
    assert codes(wlab, "http://catalog:9080/delay/1000") == [504]
    assert codes(wlab, "http://catalog:9080/delay/10") == [200]
    late = [e for e in access_log(wlab) if e["path"] == "/delay/1000"]
    assert late[-1]["response_flags"] == "UT" and late[-1]["duration_ms"] < 900


MIRRORED = re.compile(
    r'veil_waypoint_mirrored_requests_total\{backend="web/catalog-v2",response_code="200"\} (\S+)'
)


def test_redirect_rewrite_and_mirror_filters(wlab):
    out = curl(wlab, "-i", "http://catalog:9080/old/x?q=1").stdout
    assert out.startswith("HTTP/1.1 301")
    assert "location: http://catalog.example:9080/new/x?q=1" in out  # the Service port stays
    seen = answers(curl(wlab, "http://catalog:9080/v1/items").stdout)[0]
    assert seen["path"] == "/api/items" and seen["headers"]["host"] == "catalog.internal"
    assert codes(wlab, "http://catalog:9080/mirror/[1-5]") == [200] * 5
    for _ in range(50):  # the copies are sent in the background
        m = re.search(MIRRORED, waypoint_metrics(wlab))
        if m and float(m.group(1)) >= 5:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the mirror backend did not get the 5 copies")


def test_retries_hide_a_broken_replica_and_outlier_detection_ejects_it(wlab):
    assert codes(wlab, "http://flaky:9080/[1-20]") == [200] * 20
    flaky = [e for e in access_log(wlab) if e["destination_service"].startswith("flaky.")]
    assert any(e["retries"] > 0 for e in flaky)  # the broken replica answered 503 at first
    # two 503s in a row eject it for 60 s: the last requests needed no retry
    assert all(e["retries"] == 0 for e in flaky[-10:])


def test_fault_injection_aborts_about_half(wlab):
    got = codes(wlab, "http://faulty:9080/[1-200]")
    aborted = got.count(503) / len(got)
    assert 0.35 < aborted < 0.65 and set(got) == {200, 503}
    faults = [e for e in access_log(wlab) if e["response_flags"] == "FI"]
    assert faults and faults[-1]["duration_ms"] >= 20  # the 20 ms delay came first


def test_local_rate_limit_answers_429(wlab):
    got = codes(wlab, "http://limited:9080/[1-10]")
    assert got[:5] == [200] * 5 and 429 in got[5:]  # a burst of 5, then 1 per second


def test_circuit_breaker_fails_fast_over_max_requests(wlab):
    got = codes(
        wlab,
        "http://guarded:9080/delay/[300-303]",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        "4",
    )
    assert sorted(got) == [200, 503, 503, 503]
    assert any(e["response_flags"] == "UO" for e in access_log(wlab))


def test_l7_authorization_at_the_waypoint(wlab, tmp_path):
    policy = tmp_path / "l7.yaml"
    policy.write_text(
        """apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: catalog-reads, namespace: web}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog}]
  rules:
    - from: [{source: {principals: [cluster.local/ns/web/sa/client]}}]
      to: [{operation: {methods: [GET], paths: ["/items*"]}}]
      when: [{key: "request.headers[x-team]", values: [blue]}]
"""
    )
    veil("lab", "apply", "--name", wlab, "-f", str(policy))
    try:
        time.sleep(1.0)  # the waypoint reads state within a 200 ms poll
        assert codes(wlab, "http://catalog:9080/items/1", "-H", "x-team: blue") == [200]
        assert codes(wlab, "http://catalog:9080/items/1", "-H", "x-team: red") == [403]
        assert codes(wlab, "http://catalog:9080/admin", "-H", "x-team: blue") == [403]
        assert codes(wlab, "http://catalog:9080/items", "-X", "POST", "-H", "x-team: blue") == [403]
        denied = [e for e in access_log(wlab) if e["response_flags"] == "RBAC"]
        assert denied and "web/catalog-reads" in denied[-1]["error"]
        # a policy on the catalog Service: another service through the same waypoint passes
        assert codes(wlab, "http://flaky:9080/") == [200]
    finally:
        veil("lab", "delete", "--name", wlab, "authorizationpolicy", "catalog-reads", "-n", "web")
        time.sleep(1.0)  # gone from the waypoint's snapshot before the next test


def test_request_authentication_with_jwt_and_claims_in_policy(wlab, tmp_path):
    from tests.support.jwt import Issuer  # noqa: PLC0415

    iss = Issuer()
    (tmp_path / "jwks.json").write_text(iss.jwks())
    objects = tmp_path / "jwt.yaml"
    objects.write_text(
        f"""apiVersion: security.veil.dev/v1
kind: RequestAuthentication
metadata: {{name: catalog-jwt, namespace: web}}
spec:
  targetRefs: [{{kind: Service, name: catalog}}]
  jwtRules:
    - issuer: {iss.iss}
      audiences: [catalog]
      jwksUri: file://{tmp_path}/jwks.json
---
apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {{name: catalog-jwt, namespace: web}}
spec:
  targetRefs: [{{kind: Service, name: catalog}}]
  rules:
    - from: [{{source: {{requestPrincipals: ["{iss.iss}/*"]}}}}]
      when: [{{key: "request.auth.claims[team]", values: [blue]}}]
"""
    )
    veil("lab", "apply", "--name", wlab, "-f", str(objects))
    try:
        time.sleep(1.0)
        bearer = "authorization: Bearer "
        blue = iss.token(aud="catalog", team="blue")
        assert codes(wlab, "http://catalog:9080/", "-H", bearer + blue) == [200]
        red = iss.token(aud="catalog", team="red")
        assert codes(wlab, "http://catalog:9080/", "-H", bearer + red) == [403]  # policy
        assert codes(wlab, "http://catalog:9080/") == [403]  # no token: no request principal
        expired = iss.token(aud="catalog", team="blue", ttl=-3600)
        assert codes(wlab, "http://catalog:9080/", "-H", bearer + expired) == [401]
        forged = Issuer().token(aud="catalog", team="blue")
        assert codes(wlab, "http://catalog:9080/", "-H", bearer + forged) == [401]
        refused = [e for e in access_log(wlab) if e["response_code"] == 401]
        assert "Jwt verification fails" in refused[-1]["error"]
    finally:
        for kind in ("requestauthentication", "authorizationpolicy"):
            veil("lab", "delete", "--name", wlab, kind, "catalog-jwt", "-n", "web", check=False)
        time.sleep(1.0)  # gone from the waypoint's snapshot before the next test


def test_http2_prior_knowledge_from_curl(wlab, tmp_path):
    """One URL per curl: 7.88 cannot reuse a prior-knowledge connection (curl/curl#10634)."""
    out = curl(
        wlab, "--http2-prior-knowledge", "-i", "-H", "x-canary: yes", "http://catalog:9080/x"
    )
    assert out.stdout.startswith("HTTP/2 200")
    assert "x-route: canary-header" in out.stdout
    assert is_pod_of(answers(out.stdout)[0]["pod"], "catalog-v2")
    body = tmp_path / "body"
    body.write_bytes(b"y" * (2 * 1024 * 1024))
    up = curl(wlab, "--http2-prior-knowledge", "--data-binary", f"@{body}", "http://catalog:9080/u")
    assert answers(up.stdout)[0]["bodyBytes"] == 2 * 1024 * 1024
    assert codes(wlab, "http://catalog:9080/delay/1000", "--http2-prior-knowledge") == [504]


def test_h2load_multiplexed_through_the_waypoint(wlab):
    out = lab_exec(
        wlab,
        "client",
        "h2load",
        "-n",
        "400",
        "-c",
        "4",
        "-m",
        "10",
        "http://catalog:9080/",
        ns="web",
        check=False,
    ).stdout
    assert "400 succeeded, 0 failed, 0 errored" in out, out[-800:]
    assert "status codes: 400 2xx" in out


def test_backend_request_timeout_per_try_then_504(wlab):
    started = time.monotonic()
    assert codes(wlab, "http://catalog:9080/slowtry") == [504]
    took = time.monotonic() - started
    entry = [e for e in access_log(wlab) if e["path"] == "/slowtry"][-1]
    assert entry["retries"] == 1 and entry["response_flags"] == "UT"
    assert "timeouts.backendRequest" in entry["error"] and took < 1.0  # 2 tries of 200 ms


def test_a_workload_waypoint_takes_traffic_addressed_to_the_pod(wlab):
    st = json.loads(veil("lab", "status", "--name", wlab, "-o", "json").stdout)
    ip = {p["name"]: p["ip"] for p in st["pods"]}
    seen = answers(curl(wlab, f"http://{ip['solo']}:9080/direct").stdout)[0]
    assert seen["pod"] == "solo" and seen["client"].split(":")[0] == ip[pod_name(wlab, "podwp")]
    log = waypoint_log(wlab, "podwp")
    wait_for_access(log, lambda es: any(e["path"] == "/direct" for e in es))


def test_a_rate_limit_per_httproute(wlab):
    got = codes(wlab, "http://quota:9080/[1-8]")
    assert got[:3] == [200] * 3 and got[3:].count(429) >= 4
    limited = [e for e in access_log(wlab) if e["response_flags"] == "RL"]
    assert "quota-route" in limited[-1]["error"]


RAW_REQUESTS = r"""
import socket, sys, time
host = sys.argv[1]
for parts in (
    [b"G", b"ET /admin HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n"],
    [b"GET /./admin HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n"],
    [b"GET /%61dmin HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n"],
    [b"GET //admin HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n"],
    [b"GET http://catalog/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
    [b"post /admin HTTP/1.1\r\nHost: catalog\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"],
    [b"POST / HTTP/1.1\r\nHost: catalog\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n"],
):
    s = socket.create_connection((host, 9080), timeout=10)
    for p in parts:
        s.sendall(p)
        time.sleep(0.3)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data:
            break
    s.close()
    print(data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "none")
"""


def test_every_spelling_of_a_denied_request_is_denied_and_the_waypoint_serves_on(wlab, tmp_path):
    """Issue 17: raw bytes from a captured pod through its agent and the real waypoint: split
    request lines, dot segments, escapes, double slashes, absolute form and odd methods all
    meet the DENY; unframeable requests get 400; the same waypoint process answers after."""
    policy = tmp_path / "deny.yaml"
    policy.write_text(
        """apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: web}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""
    )
    veil("lab", "apply", "--name", wlab, "-f", str(policy))
    try:
        time.sleep(1.0)
        out = lab_exec(wlab, "client", "python3", "-c", RAW_REQUESTS, "catalog", ns="web").stdout
        assert out.split() == ["403"] * 6 + ["400", "400", "200"]
        st = json.loads(veil("lab", "status", "--name", wlab, "-o", "json").stdout)
        waypoint = next(p for p in st["pods"] if p["name"] == pod_name(wlab, "waypoint"))
        assert (waypoint["phase"], waypoint["restarts"]) == ("Running", 0)
    finally:
        veil("lab", "delete", "--name", wlab, "authorizationpolicy", "no-admin", "-n", "web")
        time.sleep(1.0)


def test_a_namespace_uses_a_shared_waypoint_in_another_namespace(wlab):
    """`veil.dev/use-waypoint-namespace: infra` beside `veil.dev/use-waypoint: shared` on
    namespace store: its Service's traffic goes through infra/shared (whose listener admits
    every namespace), where store's L7 policy holds; Istio's cross-namespace waypoint."""
    url = "http://inventory.store.svc.cluster.local:9080"
    assert codes(wlab, f"{url}/items") == [200]
    assert codes(wlab, f"{url}/admin/x") == [403]
    time.sleep(FLUSH_INTERVAL * 3)  # the waypoints write their access logs in batches
    entries = [
        e
        for log in (store.lab_dir(wlab) / "logs").glob("infra_shared-*_waypoint.log")
        for e in access_entries(log)
    ]  # two replicas (the next test): either may have answered
    denied = [e for e in entries if e["response_code"] == 403][-1]
    assert denied["destination_service"].startswith("inventory.store")
    assert denied["source_workload"] == "client"


def test_a_waypoint_with_two_replicas_serves_from_both(wlab):
    """`veil.dev/replicas: "2"` on infra/shared: two pods (a Deployment of 2 on Kubernetes);
    the agent picks one per connection, so 40 connections reach both."""
    shared = sorted(
        p["name"]
        for p in json.loads(veil("lab", "status", "--name", wlab, "-o", "json").stdout)["pods"]
        if p["namespace"] == "infra"
    )
    assert len(shared) == 2
    url = "http://inventory.store.svc.cluster.local:9080/items"
    for _ in range(40):
        assert codes(wlab, url) == [200]
    logs = store.lab_dir(wlab) / "logs"
    for pod in shared:
        wait_for_access(
            logs / f"infra_{pod}_waypoint.log",
            lambda es: any(e["path"] == "/items" for e in es),
        )


def test_a_waypoint_that_is_down_is_refused_never_bypassed(wlab):
    """The waypoint hung (its pod frozen: connections reach its sockets, nothing answers):
    calls to its service fail within seconds with the reason in the client's access log,
    and none goes to a backend around it; once it runs again it serves, by itself."""
    wp = labmod.find_pod(wlab, "deploy/waypoint", "web")
    freeze = Path(wp["cgroup"]) / "cgroup.freeze"
    assert answers(curl(wlab, "http://catalog.web:9080/").stdout)  # a pooled tunnel exists
    log = store.lab_dir(wlab) / "logs" / "agent-node1.log"  # the client's node
    freeze.write_text("1")
    try:
        for attempt in ("pooled", "new"):
            started = time.monotonic()
            out = lab_exec(
                wlab, "client", "curl", "-sS", "--max-time", "30",
                f"http://catalog.web:9080/{attempt}", ns="web", check=False,
            )  # fmt: skip
            assert out.returncode in (52, 56), (attempt, out)  # reset: no backend answered
            assert time.monotonic() - started < 15, attempt  # the 5 s / 10 s timeouts
        entries = wait_for_access(
            log, lambda es: len([e for e in es if "no answer" in (e.get("error") or "")]) >= 2
        )
        errors = [e["error"] for e in entries if "no answer" in (e.get("error") or "")][-2:]
        assert "no answer to CONNECT from" in errors[0], errors
        assert "TLS handshake with" in errors[1], errors  # the next one dialled a new tunnel
    finally:
        freeze.write_text("0")
    deadline = time.monotonic() + 20
    while not answers(curl(wlab, "http://catalog.web:9080/").stdout):
        assert time.monotonic() < deadline, "the waypoint did not serve again"
        time.sleep(0.5)
