"""`veil migrate`: Istio ambient manifests, taken from istio.io's ambient guides, become
Veil's, and what Veil then reads of them is what Istio meant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from veil.core.authz import parse_policy
from veil.core.migrate import migrate
from veil.core.state import build_state

# istio.io: "Add your application to the ambient mesh", "Enforce authorization policies",
# "Deploy a waypoint proxy" (Bookinfo), as `istioctl waypoint generate` prints it.
ISTIO = """
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels: {istio.io/waypoint-for: service}
  name: waypoint
  namespace: default
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/bookinfo-gateway-istio
        - cluster.local/ns/default/sa/sleep
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer-l7, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: productpage}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy, namespace: default}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata: {labels: {app: legacy, istio.io/dataplane-mode: none}}
    spec: {containers: [{name: c, image: busybox, command: [sleep, infinity]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: default}
spec:
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec: {hosts: [reviews]}
"""


def test_istio_ambient_manifests_become_veils():
    result = migrate(yaml.safe_load_all(ISTIO))
    kinds = [(o["kind"], o["metadata"]["name"]) for o in result.objects]
    assert kinds == [
        ("Namespace", "default"),
        ("Gateway", "waypoint"),
        ("AuthorizationPolicy", "productpage-viewer"),
        ("AuthorizationPolicy", "productpage-viewer-l7"),
        ("Deployment", "legacy"),
    ]
    ns, gw, l4, l7, legacy = result.objects
    assert ns["metadata"]["labels"] == {
        "veil.dev/dataplane-mode": "ambient",
        "veil.dev/use-waypoint": "waypoint",
    }
    assert gw["spec"]["gatewayClassName"] == "veil-waypoint"
    assert gw["metadata"]["labels"] == {"veil.dev/waypoint-for": "service"}
    assert legacy["spec"]["template"]["metadata"]["labels"]["veil.dev/dataplane-mode"] == "none"
    for p in (l4, l7):  # Veil reads them as Istio meant them
        assert p["apiVersion"] == "security.veil.dev/v1"
        parse_policy(p)
    state = build_state(result.objects, 1)
    assert ("default", "waypoint") in state.waypoints
    assert not state.invalid
    notes = "\n".join(result.notes)
    assert "ext-authz: left out: action CUSTOM with a selector" in notes
    assert "PeerAuthentication default/strict: left out" in notes and "mutual TLS" in notes
    assert "VirtualService default/reviews: left out" in notes and "HTTPRoute" in notes


def test_the_input_is_not_changed_and_other_objects_pass_unchanged():
    docs = list(yaml.safe_load_all(ISTIO))
    before = yaml.safe_dump_all(docs)
    migrate(docs)
    assert yaml.safe_dump_all(docs) == before
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {}}
    assert migrate([svc]).objects == [svc]


def test_veil_migrate_on_the_command_line(tmp_path: Path):
    (tmp_path / "istio.yaml").write_text(ISTIO)
    veil = str(Path(sys.executable).parent / "veil")
    proc = subprocess.run(
        [veil, "migrate", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = list(yaml.safe_load_all(proc.stdout))
    assert len(out) == 5 and out[1]["spec"]["gatewayClassName"] == "veil-waypoint"
    assert "# veil migrate: Namespace default: label istio.io/dataplane-mode" in proc.stderr


ISTIO_EXT_AUTHZ = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    accessLogFile: /dev/stdout
    extensionProviders:
    - name: "sample-ext-authz-http"
      envoyExtAuthzHttp:
        service: "ext-authz.foo.svc.cluster.local"
        port: "8000"
        includeRequestHeadersInCheck: ["x-ext-authz"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules: [{to: [{operation: {paths: ["/headers"]}}]}]
"""


def test_istios_ext_authz_setup_becomes_veils():
    """Istio's External Authorization task for a waypoint: the mesh config's providers and
    the CUSTOM policy convert, and Veil reads them as one (the policy's provider defined)."""
    result = migrate(yaml.safe_load_all(ISTIO_EXT_AUTHZ))
    mesh, _policy = result.objects
    assert (mesh["metadata"]["namespace"], mesh["metadata"]["name"]) == ("veil-system", "veil-mesh")
    assert "accessLogFile" not in mesh["data"]["mesh"]
    state = build_state(result.objects, 1)
    assert not state.invalid
    (p,) = state.policies.policies.values()
    assert p.action == "CUSTOM" and p.provider in state.mesh_config.providers
    assert any("extensionProviders kept" in n for n in result.notes)
