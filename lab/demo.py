"""`make demo`: the lab with examples/shop, real requests, then the same requests in the mesh.

1. `veil lab up` (nodes, CA, agents, pods) and calls between pods on different nodes.
2. A sniffer on the underlay shows one cross-node request in plaintext.
3. `veil lab label ns shop veil.dev/dataplane-mode=ambient` enrolls the namespace at runtime.
4. The same calls again: they still work, the apps still see the real client addresses, and
   the sniffer shows the cross-node request crossing only as TLS on port 15008.
5. The identities the CA issued, then `veil lab down` (unless --keep).

Every request runs the way a user would type it: `veil lab exec <pod> -- curl ...`. The demo
exits non-zero if a request fails or plaintext of the mesh request shows on the underlay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.lab import controlplane
from veil.lab import lab as labmod
from veil.lab.errors import LabError
from veil.lab.sniff import Sniffer
from veil.runtime.telemetry.accesslog import FLUSH_INTERVAL

VEIL = str(Path(sys.executable).parent / "veil")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # the repository's


@dataclass(frozen=True)
class Call:
    pod: str
    namespace: str
    url: str


CALLS = (
    Call("client", "shop", "http://frontend.shop/"),
    Call("client", "shop", "http://frontend.shop/"),
    Call("client", "shop", "http://catalog:9080/items"),
    Call("client", "shop", "http://orders.backoffice/"),
    Call("legacy", "backoffice", "http://cart.shop.svc.cluster.local:7070/"),
)


def curl(lab: str, c: Call, *headers: str) -> tuple[dict[str, Any] | None, str]:
    extra = [a for h in headers for a in ("-H", h)]
    proc = subprocess.run(
        [
            VEIL,
            "lab",
            "exec",
            "--name",
            lab,
            "-n",
            c.namespace,
            c.pod,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            *extra,
            c.url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None, (proc.stderr or proc.stdout).strip()
    try:
        return json.loads(proc.stdout), ""
    except ValueError:
        return None, f"not an echo answer: {proc.stdout[:80]!r}"


def run_calls(lab: str, calls: Sequence[Call], where: dict[tuple[str, str], str]) -> int:
    print(f"  {'FROM':<26} {'URL':<44} {'ANSWERED BY':<28} {'SEEN CLIENT':<19} PATH")
    failures = 0
    for c in calls:
        answer, err = curl(lab, c)
        src = f"{c.namespace}/{c.pod} ({where[(c.namespace, c.pod)]})"
        if answer is None:
            failures += 1
            print(f"  {src:<26} {c.url:<44} FAILED: {err}")
            continue
        dst = f"{answer['namespace']}/{answer['pod']} ({answer['node']})"
        hop = "same node" if answer["node"] == where[(c.namespace, c.pod)] else "crossed nodes"
        print(f"  {src:<26} {c.url:<44} {dst:<28} {answer['client']:<19} {hop}")
    return failures


def watch_underlay(lab: str, call: Call) -> tuple[bool, bool, Sniffer]:
    """One request with a unique marker header; returns (answered, marker seen in clear)."""
    marker = f"veil-demo-{secrets.token_hex(6)}"
    sniffer = Sniffer(f"/run/netns/veil-{lab}-underlay")
    answer, _err = sniffer.during(lambda: curl(lab, call, f"X-Demo-Marker: {marker}"))
    return answer is not None, bool(sniffer.plaintext(marker.encode())), sniffer


def describe_flows(sniffer: Sniffer) -> str:
    flows = sorted(sniffer.flows())
    return ", ".join(f"{s} -> {d}:{p}" for s, d, p in flows) or "none"


def enrolled(st: dict[str, Any]) -> dict[str, list[str]]:
    out = {}
    for node in st["nodes"]:
        code, body = controlplane.agent_get(node["netns"], "/config_dump")
        out[node["name"]] = (
            [f"{e['namespace']}/{e['name']}" for e in json.loads(body)["enrolled"]]
            if code == 200
            else []
        )
    return out


def attempt(lab: str, c: Call) -> str:
    answer, err = curl(lab, c)
    return f"answered by {answer['pod']}" if answer else f"REFUSED ({err.splitlines()[-1][:60]})"


def client_curl(lab: str, *args: str) -> str:
    """One curl run from the shop's client (several URLs with `[1-20]`); its output."""
    argv = [VEIL, "lab", "exec", "--name", lab, "-n", "shop", "client", "--", "curl", "-s"]
    proc = subprocess.run(
        [*argv, "--max-time", "20", *args], capture_output=True, text=True, timeout=120, check=False
    )
    return proc.stdout


def codes(lab: str, url: str, *extra: str) -> list[int]:
    out = client_curl(lab, "-o", "/dev/null", "-w", "%{http_code}\n", *extra, url)
    return [int(c) for c in out.split()]


def pods_answering(lab: str, url: str, *extra: str) -> Counter[str]:
    out = client_curl(lab, *extra, url)
    return Counter(line.split('"')[3] for line in out.splitlines() if line.startswith(' "pod": '))


def waypoint_demo(lab: str) -> int:
    """Namespace shop through its waypoint: canary, header route, retries, timeout, L7 deny."""
    examples = EXAMPLES / "shop-waypoint"
    unexpected = 0

    def expect(ok: bool, line: str) -> None:
        nonlocal unexpected
        unexpected += 0 if ok else 1
        print(f"  {line}{'' if ok else '   <- UNEXPECTED'}")

    print("\n== 5. L7: a waypoint for namespace shop (Gateway waypoint, class veil-waypoint)")
    print(
        "  veil lab delete authorizationpolicy require-mtls|cart-from-frontend -n shop  (step 4's)"
    )
    for name in ("require-mtls", "cart-from-frontend"):
        with contextlib.suppress(LabError):
            labmod.delete(lab, "authorizationpolicy", name, "shop")
    print("  veil lab label ns shop veil.dev/use-waypoint=waypoint")
    labmod.label(lab, "namespace", "shop", None, ["veil.dev/use-waypoint=waypoint"])
    print("  veil lab apply -f examples/shop-waypoint/   (HTTPRoute catalog, L7 policy on cart)")
    labmod.apply(lab, sorted(examples.glob("*.yaml")))
    time.sleep(1.5)
    spread = pods_answering(lab, "http://catalog:9080/[1-200]")
    v2 = sum(n for p, n in spread.items() if p.startswith("catalog-v2"))
    total = sum(spread.values())
    expect(  # Binomial(200, 0.1): outside 5..40 once in 10^5 runs; 50/50 gives ~100
        total == 200 and 5 <= v2 <= 40,
        f"canary, 200 requests to catalog: v1 {total - v2}, v2 {v2} (HTTPRoute weights 90/10)",
    )
    canary = pods_answering(lab, "http://catalog:9080/[1-10]", "-H", "x-canary: yes")
    expect(
        bool(canary) and all(p.startswith("catalog-v2-") for p in canary),
        f"header route, 10 requests with x-canary: yes -> {dict(canary)}",
    )
    before = codes(lab, "http://ratings:9080/[1-20]")
    expect(
        503 in before,
        f"ratings (one replica broken), no retry: {before.count(503)} of 20 answered 503",
    )
    print("  veil lab apply -f examples/shop-waypoint/later/ratings-retry.yaml (retry 3x on 503)")
    labmod.apply(lab, [examples / "later" / "ratings-retry.yaml"])
    time.sleep(1.5)
    after = codes(lab, "http://ratings:9080/[1-20]")
    expect(
        after == [200] * 20,
        f"ratings with the retry: {after.count(200)} of 20 answered 200 (the retry hid the 503s)",
    )
    started = time.monotonic()
    slow = codes(lab, "http://catalog:9080/delay/2000")
    took = time.monotonic() - started
    expect(
        slow == [504], f"timeout: /delay/2000 with timeouts.request 500ms -> {slow} in {took:.1f}s"
    )
    reads = codes(lab, "http://cart.shop:7070/")
    writes = codes(lab, "http://cart.shop:7070/", "-X", "POST")
    expect(
        reads == [200] and writes == [403], f"L7 policy on cart: GET -> {reads}, POST -> {writes}"
    )
    ns = labmod.find_pod(lab, "deploy/waypoint", "shop")["netns"]
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "curl", "-s", "127.0.0.1:15020/metrics"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    lines = [
        ln
        for ln in proc.stdout.splitlines()
        if ln.startswith("istio_requests_total{") and 'destination_workload="catalog-v2"' in ln
    ]
    print("\n  waypoint metrics (:15020/metrics), requests answered by catalog-v2:")
    for ln in lines[:3]:
        labels = dict(kv.split("=", 1) for kv in ln[ln.index("{") + 1 : ln.index("}")].split('",'))
        code = labels.get("response_code", "").strip('"')
        print(f"    istio_requests_total{{response_code={code}, ...}} {ln.rsplit(' ', 1)[1]}")
    return unexpected


def policy_demo(lab: str, st: dict[str, Any]) -> int:
    """Apply a DENY and an ALLOW policy; show refused and allowed calls and what they left."""
    policies = EXAMPLES / "shop-policies"
    cart_node = next(p["node"] for p in st["pods"] if p["name"].startswith("cart-"))
    legacy = Call("legacy", "backoffice", "http://cart.shop:7070/")
    client = Call("client", "shop", "http://cart.shop:7070/")
    frontend = Call("deploy/frontend", "shop", "http://cart.shop:7070/")
    unexpected = 0

    def show(label: str, c: Call, allowed: bool) -> None:
        nonlocal unexpected
        result = attempt(lab, c)
        if result.startswith("answered") != allowed:
            unexpected += 1
        print(f"  {label:<46} {result}")

    print("\n== 4. L4 authorization (AuthorizationPolicy, security.veil.dev/v1)")
    print("  veil lab apply -f examples/shop-policies/require-mtls.yaml    (DENY plaintext)")
    labmod.apply(lab, [policies / "require-mtls.yaml"])
    time.sleep(1)
    show("backoffice/legacy (no mesh identity) -> cart", legacy, False)
    show("shop/client (mTLS) -> cart", client, True)
    print("  veil lab apply -f examples/shop-policies/cart-from-frontend.yaml (ALLOW frontend)")
    labmod.apply(lab, [policies / "cart-from-frontend.yaml"])
    time.sleep(1)
    show("shop/client -> cart", client, False)
    show("shop/frontend -> cart", frontend, True)
    check = subprocess.run(
        [
            VEIL,
            "authz",
            "check",
            "--name",
            lab,
            "--from",
            "client",
            "-n",
            "shop",
            "--to",
            "cart:7070",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    print("\n  veil authz check --from client -n shop --to cart:7070")
    print("    " + check.stdout.strip().replace("\n", "\n    "))
    node_ns = f"veil-{lab}-{cart_node}"
    _, metrics = controlplane.agent_get(node_ns, "/metrics", 15020)
    print(f"\n  metrics on {cart_node} (the cart's node), :15020/metrics:")
    for line in metrics.splitlines():
        if line.startswith("veil_authz_denied_total") or (
            line.startswith("istio_tcp_connections_closed_total")
            and 'destination_workload="cart"' in line
            and 'reporter="destination"' in line
        ):
            print(f"    {line}")
    time.sleep(3 * FLUSH_INTERVAL)  # the agents write their access logs in batches
    log = labmod.agent_log(lab, cart_node).read_text().splitlines()
    print(f"\n  access log on {cart_node} (last lines for the cart):")
    for line in [
        x
        for x in log
        if "veil.access" in x and '"dst_workload": "cart"' in x and '"reporter": "destination"' in x
    ][-4:]:
        entry = json.loads(line.split("veil.access: ", 1)[1])
        print(
            f"    {entry['src_workload']:<10} -> cart  {entry['path']:<9} flags "
            f"{entry['response_flags']:<5} {entry['error'] or 'ok'}"[:140]
        )
    return unexpected


def print_identities(st: dict[str, Any]) -> None:
    """What the CA issued: each node's agent and the certificates it holds (never keys)."""
    print("\n== identities: certificates from `veil ca`, held by each node's agent")
    print(f"  {'NODE':<8} {'IDENTITY':<52} {'SERIAL':<10} EXPIRES")
    for node in st["nodes"]:
        code, body = controlplane.agent_get(node["netns"], "/config_dump")
        if code != 200:
            print(f"  {node['name']:<8} agent not answering ({code})")
            continue
        for cert in json.loads(body)["certificates"]:
            print(
                f"  {node['name']:<8} {cert['identity']:<52} {cert.get('serial', '-')[:8]:<10} "
                f"{cert.get('notAfter', cert['state'])}"
            )


def print_capture(st: dict[str, Any]) -> None:
    """How each node captures its pods, and what the eBPF programs counted."""
    for node in st["nodes"]:
        code, body = controlplane.agent_get(node["netns"], "/config_dump")
        if code != 200:
            continue
        cap = json.loads(body)["capture"]
        counted = ", ".join(f"{k} {v}" for k, v in cap["counters"].items() if v)
        print(f"  {node['name']}: {cap['mode']} capture" + (f" ({counted})" if counted else ""))


def run(  # noqa: PLR0917
    paths: Sequence[str],
    lab: str,
    nodes: int,
    keep: bool,
    capture: Sequence[str] = (),
    kubernetes: bool = False,
    chart: bool = False,
) -> int:
    kubernetes = kubernetes or chart
    flags = "".join(f" --capture {c}" for c in capture) + (" --kubernetes" if kubernetes else "")
    flags += " --chart" if chart else ""
    print(f"== veil lab up -f {' '.join(paths)} --name {lab} --nodes {nodes}{flags}")
    labmod.up(paths, lab, nodes, capture=capture, kubernetes=kubernetes, chart=chart)
    failures = 0
    try:
        st = labmod.status(lab)
        print(labmod.format_status(st))
        where = {(p["namespace"], p["name"]): p["node"] for p in st["pods"]}
        remote = next(
            (
                p
                for p in st["pods"]
                if p["name"].startswith("frontend-") and p["node"] != where[("shop", "client")]
            ),
            None,
        )
        if remote is None:
            raise LabError("no frontend pod on another node than shop/client to probe")
        probe = Call("client", "shop", f"http://{remote['ip']}:8080/")
        calls = (*CALLS, probe)

        print("\n== 1. plain Kubernetes networking: requests between pods")
        failures += run_calls(lab, calls, where)
        ok, clear, sniffer = watch_underlay(lab, probe)
        print(
            f"\n  underlay during shop/client -> {remote['name']} ({remote['node']}): "
            f"{describe_flows(sniffer)}; request bytes visible in plaintext: "
            f"{'YES' if clear else 'no'}"
        )

        print("\n== 2. veil lab label ns shop veil.dev/dataplane-mode=ambient")
        labmod.label(lab, "namespace", "shop", None, ["veil.dev/dataplane-mode=ambient"])
        want = {
            p["namespace"] + "/" + p["name"]
            for p in st["pods"]
            if p["namespace"] == "shop"
            and p.get("labels", {}).get("veil.dev/dataplane-mode") != "none"  # the waypoint
        }
        start = time.monotonic()
        while {x for v in enrolled(st).values() for x in v} != want:
            if time.monotonic() - start > 10:
                raise LabError("the agents did not enroll namespace shop within 10 s")
            time.sleep(0.1)
        print(
            f"  enrolled in {time.monotonic() - start:.1f}s: "
            + "; ".join(f"{n}: {', '.join(v)}" for n, v in enrolled(st).items())
        )

        print(
            "\n== 3. the same requests, now through the mesh (HBONE: HTTP/2 CONNECT over "
            "mutual TLS)"
        )
        failures += run_calls(lab, calls, where)
        ok, clear, sniffer = watch_underlay(lab, probe)
        only_hbone = bool(sniffer.flows()) and all(p == 15008 for _s, _d, p in sniffer.flows())
        print(
            f"\n  underlay during shop/client -> {remote['name']} ({remote['node']}): "
            f"{describe_flows(sniffer)}; request bytes visible in plaintext: "
            f"{'YES' if clear else 'no'}"
        )
        if not ok or clear or not only_hbone:
            failures += 1
            print("  FAILED: the mesh request must cross only as TLS on 15008")
        else:
            print("  -> encrypted: only mutual TLS on port 15008 crosses between nodes")
        print_capture(st)

        spread: Counter[str] = Counter()
        for _ in range(20):
            answer, _err = curl(lab, Call("client", "shop", "http://catalog:9080/"))
            if answer is None:
                failures += 1
                continue
            spread[f"{answer['pod']} ({answer['node']})"] += 1
        print("\n== load spread in the mesh: 20 requests to the catalog VIP (v1 and v2)")
        for pod, n in sorted(spread.items()):
            print(f"  {pod:<28} {n:>3} {'#' * n}")
        failures += policy_demo(lab, st)
        failures += waypoint_demo(lab)
        print_identities(st)
        print(
            f"\n== summary: {failures} unexpected results; namespace shop is in the mesh, "
            "backoffice is not (its calls pass through or arrive on 15006)"
        )
        if keep:
            print(
                f"\nThe lab stays up (KEEP=1). Try:\n"
                f"  {VEIL} lab exec client -- curl -s http://frontend.shop/\n"
                f"  {VEIL} lab status\n  {VEIL} lab down --name {lab}"
            )
    finally:
        if not keep:
            print(f"\n== veil lab down --name {lab}")
            labmod.down(lab)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m veil.lab.demo")
    p.add_argument("-f", "--filename", action="append", default=None)
    p.add_argument("--name", default="demo")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="leave the lab running")
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="on the real control plane: manifests applied with kubectl, pods run by the "
        "lab's kubelets, Veil reading the API (make demo KUBE=1)",
    )
    p.add_argument(
        "--chart",
        action="store_true",
        help="on the real control plane with Veil installed by its Helm chart: the lab's "
        "kubelets run the agent DaemonSet, the CA and the controller (make demo CHART=1)",
    )
    p.add_argument(
        "--capture",
        action="append",
        default=[],
        metavar="[NODE=]MODE",
        help="iptables (default) or ebpf, for every node or one",
    )
    args = p.parse_args(argv)
    try:
        return run(
            args.filename or ["examples/shop/"],
            args.name,
            args.nodes,
            args.keep,
            args.capture,
            args.kubernetes,
            args.chart,
        )
    except (LabError, ValueError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
