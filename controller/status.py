"""The status Veil writes on what it reads (pure functions of the object and the state):
`Accepted` on AuthorizationPolicies, RequestAuthentications and TrafficPolicies, with the
parser's reason when one is refused; `Accepted` / `ResolvedRefs` per parent on HTTPRoutes,
GRPCRoutes and TCPRoutes,
as Gateway API's route status has them. The controller is the one writer (app.py).

A condition keeps its lastTransitionTime while its status holds, so writing the same
verdict again changes nothing, and `differs` compares verdicts without the timestamps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from veil.core.routes import reference_granted
from veil.core.state import MeshState, object_key

CONTROLLER_NAME = "veil.dev/waypoint-controller"
POLICY_KINDS = ("AuthorizationPolicy", "RequestAuthentication", "TrafficPolicy")
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "TCPRoute")


def condition(  # noqa: PLR0917 - the fields of one condition
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    obj: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = str(old["lastTransitionTime"]) if old and old.get("status") == status else now
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "observedGeneration": int(obj["metadata"].get("generation") or 0),
        "lastTransitionTime": since,
    }


def _old(conditions: Any, kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == kind), None)


def policy_status(obj: Mapping[str, Any], state: MeshState, now: str) -> dict[str, Any]:
    """Accepted, or not with the parser's reason (an AuthorizationPolicy that is not
    accepted is enforced as deny-all or by its last valid version: it never fails open)."""
    err = state.invalid.get(object_key(obj))
    old = _old((obj.get("status") or {}).get("conditions"), "Accepted")
    if err is None:
        cond = condition("Accepted", True, "Accepted", "in force", obj, old, now)
    else:
        cond = condition("Accepted", False, "Invalid", err, obj, old, now)
    return {"conditions": [cond]}


def _unresolved(obj: Mapping[str, Any], state: MeshState) -> tuple[str, str] | None:
    """(reason, message) when a backendRef cannot be used, None when all can."""
    md = obj["metadata"]
    ns = md.get("namespace", "default")
    parents = [
        (str(p.get("namespace", ns)), str(p.get("name", "")))
        for p in (obj.get("spec") or {}).get("parentRefs") or []
        if isinstance(p, dict) and p.get("kind") == "Service"
    ]
    for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
        for j, ref in enumerate(rule.get("backendRefs") or []):
            where = f"rules[{i}].backendRefs[{j}]"
            if ref.get("kind", "Service") != "Service" or ref.get("group", "") not in ("", "core"):
                return "InvalidKind", f"{where}: only Services are backends"
            to_ns, name = ref.get("namespace", ns), str(ref.get("name", ""))
            if not reference_granted(state.reference_grants, ns, to_ns, name, parents):
                return (
                    "RefNotPermitted",
                    f"{where}: Service {to_ns}/{name} is in another namespace and no "
                    "ReferenceGrant there allows it",
                )
            if state.service(to_ns, name) is None:
                return "BackendNotFound", f"{where}: no Service {to_ns}/{name}"
    return None


def route_status(obj: Mapping[str, Any], state: MeshState, now: str) -> dict[str, Any]:
    """One entry per parentRef (ours; other controllers' entries are kept as they are)."""
    md = obj["metadata"]
    ns = md.get("namespace", "default")
    err = state.invalid.get(object_key(obj))
    kind = obj.get("kind")
    parsed = any(
        r.kind == kind and r.namespace == ns and r.name == md["name"]
        for r in (*state.routes, *state.tcp_routes)
    )
    unresolved = _unresolved(obj, state)
    old_parents = (obj.get("status") or {}).get("parents") or []
    others = [p for p in old_parents if p.get("controllerName") != CONTROLLER_NAME]
    ours = []
    for ref in (obj.get("spec") or {}).get("parentRefs") or []:
        old = next(
            (
                p.get("conditions")
                for p in old_parents
                if p.get("controllerName") == CONTROLLER_NAME and p.get("parentRef") == ref
            ),
            None,
        )
        is_service = ref.get("kind") == "Service" and ref.get("group", "") in ("", "core")
        parent_ns = ref.get("namespace", ns)
        if not parsed:
            accepted = condition(
                "Accepted",
                False,
                "UnsupportedValue",
                err or "not read",
                obj,
                _old(old, "Accepted"),
                now,
            )
        elif not is_service:
            accepted = condition(
                "Accepted", False, "NoMatchingParent", "Veil serves routes whose parent is a "
                "Service (GAMMA)", obj, _old(old, "Accepted"), now,
            )  # fmt: skip
        elif state.service(parent_ns, str(ref.get("name"))) is None:
            accepted = condition(
                "Accepted", False, "NoMatchingParent", f"no Service {parent_ns}/{ref.get('name')}",
                obj, _old(old, "Accepted"), now,
            )  # fmt: skip
        else:
            message = "in force" if err is None else f"in force, but: {err}"
            accepted = condition(
                "Accepted", True, "Accepted", message, obj, _old(old, "Accepted"), now
            )
        if unresolved is None:
            resolved = condition(
                "ResolvedRefs", True, "ResolvedRefs", "", obj, _old(old, "ResolvedRefs"), now
            )
        else:
            resolved = condition(
                "ResolvedRefs", False, *unresolved, obj, _old(old, "ResolvedRefs"), now
            )
        ours.append(
            {
                "parentRef": ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved],
            }
        )
    return {"parents": [*others, *ours]}


def desired_status(obj: Mapping[str, Any], state: MeshState, now: str) -> dict[str, Any] | None:
    kind = obj.get("kind")
    if kind in POLICY_KINDS:
        return policy_status(obj, state, now)
    if kind in ROUTE_KINDS:
        return route_status(obj, state, now)
    return None


def _no_times(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _no_times(v) for k, v in value.items() if k != "lastTransitionTime"}
    if isinstance(value, list):
        return [_no_times(v) for v in value]
    return value


def differs(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether writing `desired` would change the verdicts (timestamps aside)."""
    current = current or {}
    return any(_no_times(current.get(k)) != _no_times(v) for k, v in desired.items())
