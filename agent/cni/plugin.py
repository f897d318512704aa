"""`veil-cni`: a chained CNI plugin (CNI spec 1.0: ADD, DEL, CHECK, VERSION).

Runs after the interface plugin (ptp, bridge, ...): on ADD it asks the node's agent (the
`agentSocket` in its network configuration) to capture the new pod and returns the previous
result only once the agent confirms capture and listeners are in place. If the agent cannot
be reached, ADD fails with code 11 ("try again later"): the runtime retries, and the pod
never starts uncaptured. DEL never fails (the spec wants it idempotent and best-effort).
Pods of the namespaces in `excludeNamespaces` (the mesh's own, kube-system) pass through
without asking the agent, as with Istio's plugin: they start before the agent can run, and
are never in the mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from typing import Any

SUPPORTED = ["0.4.0", "1.0.0"]
AGENT_TIMEOUT = 20.0


def cni_args(value: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in value.split(";") if "=" in kv)


def ask_agent(path: str, request: dict[str, Any], timeout: float = AGENT_TIMEOUT) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    answer: dict[str, Any] = json.loads(buf)
    return answer


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


def error(version: str, code: int, msg: str, details: str = "") -> int:
    print(json.dumps({"cniVersion": version, "code": code, "msg": msg, "details": details}))
    return 1


def run(env: dict[str, str], stdin: str) -> int:
    command = env.get("CNI_COMMAND", "")
    try:
        conf: Any = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, RecursionError) as e:
        return error("1.0.0", 6, "veil-cni: the network configuration is not JSON", str(e))
    if not isinstance(conf, dict):
        return error("1.0.0", 6, "veil-cni: the network configuration is not a JSON object")
    version = str(conf.get("cniVersion", "1.0.0"))
    if command == "VERSION":
        print(json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED}))
        return 0
    args = cni_args(env.get("CNI_ARGS", ""))
    request = {
        "namespace": args.get("K8S_POD_NAMESPACE", ""),
        "name": args.get("K8S_POD_NAME", ""),
        "netns": env.get("CNI_NETNS", ""),
    }
    excluded = conf.get("excludeNamespaces") or []
    prev_result = conf.get("prevResult")
    if isinstance(excluded, list) and request["namespace"] in excluded:
        if command != "ADD":
            return 0
        if isinstance(prev_result, dict):
            print(json.dumps({**prev_result, "cniVersion": version}))
            return 0
    path = str(conf.get("agentSocket", ""))
    if not path:
        return error(version, 7, "veil-cni: agentSocket missing from the network configuration")
    if command == "DEL":
        # If the agent is gone, nothing of ours is left to undo: DEL still succeeds.
        with contextlib.suppress(OSError, ValueError):
            ask_agent(path, {"command": "DEL", **request}, timeout=5)
        return 0
    prev = conf.get("prevResult")
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
    try:
        answer = ask_agent(path, {"command": command, **request})
    except (OSError, ValueError) as e:
        return error(
            version,
            11,
            f"veil agent unreachable at {path}: {e}",
            "the pod must not start uncaptured; the runtime should retry once the "
            "node's veil agent runs",
        )
    if not answer.get("ok"):
        return error(version, 11, f"veil agent refused {command}: {answer.get('error')}")
    if command == "ADD":
        print(json.dumps({**prev, "cniVersion": version}))
    return 0


def main() -> None:
    sys.exit(run(dict(os.environ), sys.stdin.read()))
