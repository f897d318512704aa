"""What a Gateway of class `veil-waypoint` becomes on Kubernetes (pure functions): a
ServiceAccount `<gateway>` (the waypoint's identity), a Service on HBONE 15008, the trust
bundle as a ConfigMap, and a Deployment running `veil waypoint` with a projected token for
the CA (audience `veil-ca`), all owned by the Gateway so deleting it removes them; and the
Gateway's status (Accepted, Programmed, the Service's address), as Gateway API asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from veil.core.ports import HBONE_PORT
from veil.core.state import (
    DATAPLANE_MODE,
    GATEWAY_NAME_LABEL,
    NONE,
    WAYPOINT_CLASS,
    waypoint_replicas,
)

GATEWAY_API = "gateway.networking.k8s.io/v1"
CA_AUDIENCE = "veil-ca"
TOKEN_DIR, ROOT_DIR = "/var/run/veil/token", "/var/run/veil/ca"
WAYPOINTS_BINDING = "veil-waypoints"  # lets every waypoint read the state it routes by
STATE_READER_ROLE = "veil-state-reader"


@dataclass(frozen=True)
class Settings:
    image: str
    ca_address: str
    trust_domain: str = "cluster.local"


def is_waypoint(gateway: Mapping[str, Any]) -> bool:
    return (gateway.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS


def _owner(gateway: Mapping[str, Any]) -> dict[str, Any]:
    md = gateway["metadata"]
    return {
        "apiVersion": GATEWAY_API,
        "kind": "Gateway",
        "name": md["name"],
        "uid": md["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(gateway: Mapping[str, Any], name: str) -> dict[str, Any]:
    md = gateway["metadata"]
    return {
        "name": name,
        "namespace": md["namespace"],
        "labels": {GATEWAY_NAME_LABEL: md["name"], "app.kubernetes.io/managed-by": "veil"},
        "ownerReferences": [_owner(gateway)],
    }


def ca_root_name(gateway: str) -> str:
    return f"{gateway}-ca-root"


def waypoint_objects(
    gateway: Mapping[str, Any], settings: Settings, bundle: str
) -> list[dict[str, Any]]:
    """The objects to apply (server-side) for one waypoint Gateway."""
    md = gateway["metadata"]
    name, ns = str(md["name"]), str(md["namespace"])
    selector = {GATEWAY_NAME_LABEL: name}
    args = [
        "waypoint",
        "--gateway", name,
        "--namespace", ns,
        "--kubeconfig", "in-cluster",
        "--ca-address", settings.ca_address,
        "--ca-root", f"{ROOT_DIR}/root-cert.pem",
        "--token-file", f"{TOKEN_DIR}/token",
        "--trust-domain", settings.trust_domain,
    ]  # fmt: skip
    # Replicas only when the Gateway says (`veil.dev/replicas`); otherwise the field is not
    # ours, so `kubectl scale` or an HPA keep what they set (server-side apply).
    try:
        replicas = waypoint_replicas(md.get("annotations") or {})
    except ValueError:
        replicas = None  # the Gateway's status says why (gateway_status)
    scale = {"replicas": replicas} if replicas is not None else {}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(gateway, name)},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(gateway, ca_root_name(name)),
            "data": {"root-cert.pem": bundle},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(gateway, name),
            "spec": {
                "selector": selector,
                "ports": [
                    {
                        "name": "mesh",
                        "port": HBONE_PORT,
                        "targetPort": HBONE_PORT,
                        "appProtocol": "hbone",
                    }
                ],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(gateway, name),
            "spec": {
                **scale,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": {**selector, DATAPLANE_MODE: NONE}},
                    "spec": {
                        "serviceAccountName": name,
                        "containers": [
                            {
                                "name": "waypoint",
                                "image": settings.image,
                                "args": args,
                                "ports": [{"name": "mesh", "containerPort": HBONE_PORT}],
                                "volumeMounts": [
                                    {"name": "veil-token", "mountPath": TOKEN_DIR},
                                    {"name": "ca-root", "mountPath": ROOT_DIR},
                                ],
                            }
                        ],
                        "volumes": [
                            {
                                "name": "veil-token",
                                "projected": {
                                    "sources": [
                                        {
                                            "serviceAccountToken": {
                                                "audience": CA_AUDIENCE,
                                                "expirationSeconds": 3600,
                                                "path": "token",
                                            }
                                        }
                                    ]
                                },
                            },
                            {"name": "ca-root", "configMap": {"name": ca_root_name(name)}},
                        ],
                    },
                },
            },
        },
    ]


def waypoints_binding(gateways: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One ClusterRoleBinding for every waypoint's service account (a cluster-scoped object
    cannot be owned by a namespaced Gateway; the controller keeps its subjects current)."""
    subjects = sorted(
        {(g["metadata"]["namespace"], g["metadata"]["name"]) for g in gateways if is_waypoint(g)}
    )
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": WAYPOINTS_BINDING,
            "labels": {"app.kubernetes.io/managed-by": "veil"},
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": STATE_READER_ROLE,
        },
        "subjects": [
            {"kind": "ServiceAccount", "namespace": ns, "name": name} for ns, name in subjects
        ],
    }


def _condition(  # noqa: PLR0917 - the fields of one Gateway API condition
    kind: str, ok: bool, reason: str, message: str, generation: int, since: str
) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def gateway_status(
    gateway: Mapping[str, Any], address: str | None, ready: int, now: str
) -> dict[str, Any]:
    """Accepted always (the class is ours); Programmed once a replica is ready and the
    Service has its address. A condition keeps its lastTransitionTime while its status holds."""
    generation = int(gateway["metadata"].get("generation") or 0)
    before = {c.get("type"): c for c in ((gateway.get("status") or {}).get("conditions") or [])}

    def since(kind: str, ok: bool) -> str:
        old = before.get(kind)
        same = old is not None and old.get("status") == ("True" if ok else "False")
        return str(old["lastTransitionTime"]) if same and old else now

    try:
        waypoint_replicas(gateway["metadata"].get("annotations") or {})
        note = ""
    except ValueError as e:
        note = f"{e}: ignored"
    programmed = bool(address) and ready > 0
    message = (
        f"{ready} ready replica(s), address {address}"
        if programmed
        else "waiting for a ready replica and the Service's address"
    )
    status: dict[str, Any] = {
        "conditions": [
            _condition("Accepted", True, "Accepted", note, generation, since("Accepted", True)),
            _condition(
                "Programmed",
                programmed,
                "Programmed" if programmed else "Pending",
                message,
                generation,
                since("Programmed", programmed),
            ),
        ]
    }
    if address:
        status["addresses"] = [{"type": "IPAddress", "value": address}]
    return status
