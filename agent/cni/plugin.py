"""veil-cni's logic, run by the agent: a chained CNI plugin (CNI spec 1.0: ADD, DEL, CHECK,
VERSION).

The executable on the node is a small static C program (agent/cni/shim/veil-cni.c): it
forwards the runtime's request (CNI_* environment, configuration on stdin) to the agent's
socket and prints what `answer()` returns here, so the host needs no Python. It runs after the
interface plugin (ptp, bridge, ...): ADD answers the previous result only once the agent
captured the pod. If the agent cannot be reached, the shim fails ADD with code 11 ("try again
later"): the runtime retries, and the pod never starts uncaptured. DEL never fails (the spec
wants it idempotent and best-effort). Pods of the namespaces in `excludeNamespaces` (the
mesh's own, kube-system) pass through without enrollment, as with Istio's plugin: they start
before the agent can run (the shim lets them through on its own then), and are never in the
mesh.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

SUPPORTED = ["0.4.0", "1.0.0"]

Ask = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]  # the agent's enrollment endpoint


def cni_args(value: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in value.split(";") if "=" in kv)


def pod_ip(prev: dict[str, Any]) -> str:
    ips = prev.get("ips")
    for entry in ips if isinstance(ips, list) else []:
        address = str(entry.get("address", "")) if isinstance(entry, dict) else ""
        if "." in address:
            return address.split("/", maxsplit=1)[0]
    raise ValueError(
        "the previous plugin's result has no IPv4 address (veil-cni is chained "
        "after an interface plugin such as ptp)"
    )


def error(version: str, code: int, msg: str, details: str = "") -> tuple[int, str]:
    doc = {"cniVersion": version, "code": code, "msg": msg, "details": details}
    return 1, json.dumps(doc) + "\n"


async def answer(env: dict[str, str], stdin: str, ask: Ask) -> tuple[int, str]:
    """The plugin's exit code and stdout for one CNI request."""
    command = env.get("CNI_COMMAND", "")
    try:
        conf: Any = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, RecursionError) as e:
        return error("1.0.0", 6, "veil-cni: the network configuration is not JSON", str(e))
    if not isinstance(conf, dict):
        return error("1.0.0", 6, "veil-cni: the network configuration is not a JSON object")
    version = str(conf.get("cniVersion", "1.0.0"))
    if command == "VERSION":
        return 0, json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED}) + "\n"
    args = cni_args(env.get("CNI_ARGS", ""))
    request = {
        "namespace": args.get("K8S_POD_NAMESPACE", ""),
        "name": args.get("K8S_POD_NAME", ""),
        "netns": env.get("CNI_NETNS", ""),
    }
    excluded = conf.get("excludeNamespaces") or []
    prev = conf.get("prevResult")
    if isinstance(excluded, list) and request["namespace"] in excluded:
        if command != "ADD":
            return 0, ""
        if isinstance(prev, dict):
            return 0, json.dumps({**prev, "cniVersion": version}) + "\n"
    if command == "DEL":
        await ask({"command": "DEL", **request})  # a success either way: best-effort
        return 0, ""
    if command not in ("ADD", "CHECK"):
        return error(version, 4, f"veil-cni: unknown CNI_COMMAND {command!r}")
    if not isinstance(prev, dict):
        return error(
            version, 7, "veil-cni must be chained after an interface plugin (no prevResult)"
        )
    try:
        request["ip"] = pod_ip(prev)
    except ValueError as e:
        return error(version, 7, f"veil-cni: {e}")
    if not request["namespace"] or not request["name"]:
        return error(version, 7, "veil-cni: CNI_ARGS lacks K8S_POD_NAMESPACE/K8S_POD_NAME")
    got = await ask({"command": command, **request})
    if not got.get("ok"):
        return error(version, 11, f"veil agent refused {command}: {got.get('error')}")
    if command == "ADD":
        return 0, json.dumps({**prev, "cniVersion": version}) + "\n"
    return 0, ""
