"""What the agent does to its Node and asks of its DaemonSet on Kubernetes.

- The startup taint `veil.dev/not-ready:NoSchedule` (registered with the node, e.g. kubelet
  `--register-with-taints`): no pod is scheduled on a node before its agent can capture; the
  agent removes it once ready. Removing is a JSON patch that tests the list it read, so a
  concurrent change to other taints is never lost.
- Uninstall: when the agent stops and its DaemonSet is gone (`helm uninstall`), the stop is
  for good: it releases every pod and takes veil-cni off the node. The agent watches its
  DaemonSet (`DaemonSetWatch`): by the time it is sent SIGTERM, `helm uninstall` has usually
  deleted its RBAC and service account too, so asking only then would be refused. Any doubt
  (the API unreachable, a DaemonSet still there) means a restart: capture stays.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

log = logging.getLogger("veil.node")
NOT_READY_TAINT = "veil.dev/not-ready"


def without_taint(taints: list[dict[str, Any]] | None, key: str) -> list[dict[str, Any]] | None:
    """The node's taints without `key`; None when it has none of that key. Pure."""
    taints = list(taints or [])
    kept = [t for t in taints if t.get("key") != key]
    return None if len(kept) == len(taints) else kept


def taint_patch(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A JSON patch that applies only if the taints are still `old`."""
    return [
        {"op": "test", "path": "/spec/taints", "value": old},
        {"op": "replace", "path": "/spec/taints", "value": new},
    ]


async def remove_taint(client: Any, node: str, key: str = NOT_READY_TAINT) -> bool:
    """Remove `key` from the Node's taints; True if it was there. Retries conflicts."""
    from lightkube.core.exceptions import ApiError  # noqa: PLC0415
    from lightkube.resources.core_v1 import Node  # noqa: PLC0415
    from lightkube.types import PatchType  # noqa: PLC0415

    for _ in range(10):
        obj = await client.get(Node, node)
        old = [t.to_dict() for t in (obj.spec.taints or [])]
        new = without_taint(old, key)
        if new is None:
            return False
        try:
            await client.patch(Node, node, taint_patch(old, new), patch_type=PatchType.JSON)
        except ApiError as e:
            if e.status.code in (409, 422):  # the test failed: someone changed them meanwhile
                continue
            raise
        return True
    raise RuntimeError(f"node {node}: its taints kept changing")


async def daemonset_deleted(client: Any, ref: str) -> bool:
    """True only when the API says the DaemonSet is gone or being deleted."""
    from lightkube.core.exceptions import ApiError  # noqa: PLC0415
    from lightkube.resources.apps_v1 import DaemonSet  # noqa: PLC0415

    namespace, name = ref.split("/", 1)
    try:
        with trio.fail_after(5):
            obj = await client.get(DaemonSet, name, namespace=namespace)
    except ApiError as e:
        if e.status.code == 404:
            return True
        log.warning("cannot tell whether DaemonSet %s is deleted (%s): keeping capture", ref, e)
        return False
    except Exception as e:  # unreachable API, timeout: a restart is the safe guess
        log.warning("cannot tell whether DaemonSet %s is deleted (%s): keeping capture", ref, e)
        return False
    return obj.metadata.deletionTimestamp is not None


class DaemonSetWatch:
    """Remembers whether the agent's own DaemonSet was deleted (watched, not asked at the
    end: see the module docstring)."""

    def __init__(self, client: Any, ref: str) -> None:
        self.client = client
        self.namespace, self.name = ref.split("/", 1)
        self.deleted = False

    async def run(self) -> None:
        from lightkube.resources.apps_v1 import DaemonSet  # noqa: PLC0415

        while True:
            try:
                async for op, obj in self.client.watch(
                    DaemonSet,
                    namespace=self.namespace,
                    fields={"metadata.name": self.name},
                ):
                    if op == "DELETED" or obj.metadata.deletionTimestamp is not None:
                        if not self.deleted:
                            log.warning(
                                "DaemonSet %s/%s is being deleted", self.namespace, self.name
                            )
                        self.deleted = True
            except Exception as e:  # API away, RBAC gone after an uninstall: what we saw stays
                log.debug("watching DaemonSet %s/%s: %s", self.namespace, self.name, e)
            await trio.sleep(2)

    async def is_deleted(self) -> bool:
        return self.deleted or await daemonset_deleted(self.client, f"{self.namespace}/{self.name}")
