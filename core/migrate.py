"""`veil migrate`: Istio ambient manifests as Veil's (pure functions).

What converts, one to one:

- labels `istio.io/dataplane-mode`, `istio.io/use-waypoint`, `istio.io/waypoint-for`,
  `istio.io/use-waypoint-namespace` and `istio.io/ingress-use-waypoint` on any object ->
  the same `veil.dev/...` labels;
- `security.istio.io/v1` (and `v1beta1`) AuthorizationPolicy and RequestAuthentication ->
  `security.veil.dev/v1` (the same schema; a `CUSTOM` policy with a `selector` is left out
  and reported: in Istio's ambient mode ztunnel does not enforce it either, and Veil
  enforces CUSTOM at waypoints, through `targetRefs`);
- a Gateway of class `istio-waypoint` -> class `veil-waypoint`;
- Istio's mesh config (ConfigMap `istio` in `istio-system`) -> ConfigMap `veil-mesh` in
  `veil-system` with its `extensionProviders` only (the ext_authz providers of CUSTOM
  policies; the rest of MeshConfig is Istio's own).

What does not, and why (reported, left out): PeerAuthentication (Veil's mesh traffic is
always mutual TLS; a DENY on plaintext is an AuthorizationPolicy, see docs/authz.md);
VirtualService and DestinationRule (HTTPRoute and TrafficPolicy say the same for mesh
traffic); Istio's other kinds. Anything else (Deployments, Services, ...) passes unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

LABELS = {
    "istio.io/dataplane-mode": "veil.dev/dataplane-mode",
    "istio.io/use-waypoint": "veil.dev/use-waypoint",
    "istio.io/waypoint-for": "veil.dev/waypoint-for",
    "istio.io/use-waypoint-namespace": "veil.dev/use-waypoint-namespace",
    "istio.io/ingress-use-waypoint": "veil.dev/ingress-use-waypoint",
}
SECURITY_KINDS = ("AuthorizationPolicy", "RequestAuthentication")
ISTIO_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")
WAYPOINT_CLASSES = {"istio-waypoint": "veil-waypoint"}
NOT_CONVERTED = {
    "PeerAuthentication": "Veil's mesh traffic is always mutual TLS; to refuse plaintext, "
    "use an AuthorizationPolicy (docs/authz.md)",
    "VirtualService": "write an HTTPRoute (Gateway API) for mesh routing",
    "DestinationRule": "write a TrafficPolicy (traffic.veil.dev/v1) for retries, limits "
    "and outlier detection",
}


@dataclass
class Migration:
    objects: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what changed, what was left out and why


def _ref(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata") or {}
    where = f"{md.get('namespace')}/" if md.get("namespace") else ""
    return f"{obj.get('kind', '?')} {where}{md.get('name', '?')}"


def _labels(obj: dict[str, Any], notes: list[str]) -> None:
    """Istio's ambient labels on the object (and a pod template's) become Veil's."""
    holders = [obj.get("metadata")]
    template = (obj.get("spec") or {}).get("template")
    if isinstance(template, dict):
        holders.append(template.get("metadata"))
    for md in holders:
        if not isinstance(md, dict) or not isinstance(md.get("labels"), dict):
            continue
        labels = md["labels"]
        for old, new in LABELS.items():
            if old in labels:
                value = labels.pop(old)
                if new in labels and labels[new] != value:
                    notes.append(
                        f"{_ref(obj)}: {old}={value} dropped, {new}={labels[new]} is already set"
                    )
                    continue
                labels[new] = value
                notes.append(f"{_ref(obj)}: label {old} -> {new}")


def migrate_object(obj: Mapping[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """The Veil form of one object, or None when it has none (the reason is in `notes`)."""
    out = copy.deepcopy(dict(obj))
    kind, api = out.get("kind"), str(out.get("apiVersion", ""))
    if api.startswith("networking.istio.io/") or api.startswith("security.istio.io/"):
        if kind in SECURITY_KINDS and api in ISTIO_SECURITY:
            spec = out.get("spec") or {}
            if spec.get("action") == "CUSTOM" and not ("targetRefs" in spec or "targetRef" in spec):
                notes.append(
                    f"{_ref(out)}: left out: action CUSTOM with a selector (Istio's ztunnel "
                    "does not enforce it either); attach it to a waypoint with targetRefs"
                )
                return None
            out["apiVersion"] = "security.veil.dev/v1"
            notes.append(f"{_ref(out)}: {api} -> security.veil.dev/v1")
        else:
            why = NOT_CONVERTED.get(str(kind), "Veil has no equivalent")
            notes.append(f"{_ref(out)}: left out ({api}): {why}")
            return None
    md = out.get("metadata") or {}
    if kind == "ConfigMap" and (md.get("namespace"), md.get("name")) == ("istio-system", "istio"):
        return _mesh_config(out, notes)
    if kind == "Gateway" and api.startswith("gateway.networking.k8s.io/"):
        spec = out.get("spec") or {}
        if spec.get("gatewayClassName") in WAYPOINT_CLASSES:
            old = spec["gatewayClassName"]
            spec["gatewayClassName"] = WAYPOINT_CLASSES[old]
            notes.append(f"{_ref(out)}: gatewayClassName {old} -> {spec['gatewayClassName']}")
    _labels(out, notes)
    return out


def _mesh_config(obj: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """Istio's MeshConfig -> Veil's mesh config: its extensionProviders only."""
    try:
        mesh = yaml.safe_load((obj.get("data") or {}).get("mesh") or "") or {}
    except yaml.YAMLError as e:
        notes.append(f"{_ref(obj)}: left out: its mesh config is not YAML ({e})")
        return None
    providers = mesh.get("extensionProviders") if isinstance(mesh, dict) else None
    if not providers:
        notes.append(f"{_ref(obj)}: left out: no extensionProviders (the rest is Istio's own)")
        return None
    notes.append(
        f"{_ref(obj)} -> ConfigMap veil-system/veil-mesh: extensionProviders kept, the rest of "
        "Istio's MeshConfig left out"
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"namespace": "veil-system", "name": "veil-mesh"},
        "data": {"mesh": yaml.safe_dump({"extensionProviders": providers}, sort_keys=False)},
    }


def migrate(objects: Iterable[Mapping[str, Any] | None]) -> Migration:
    result = Migration()
    for obj in objects:
        if not obj:
            continue
        converted = migrate_object(obj, result.notes)
        if converted is not None:
            result.objects.append(converted)
    return result
