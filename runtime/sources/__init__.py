"""Cluster state sources: the one way state flows is sources -> one immutable MeshState
snapshot -> consumers.

A source (`manifests.ManifestSource` over the lab's state directory; a Kubernetes source
behind the same interface) turns what it reads into events for `veil.core.state.StateBuilder`,
which builds each new snapshot; the single writer, `veil.runtime.store.StateStore.update()`,
swaps it in. Consumers (the CA's authorizer, the certificate manager, capture, proxies,
policy) only read `store.current` and wait for newer versions; nothing reaches around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import trio

from veil.runtime.store import StateStore

IN_CLUSTER = "in-cluster"


class Source(Protocol):
    async def run(
        self, store: StateStore, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def not_synced(self) -> str | None:
        """Why the state may be stale right now (None: in sync), for readiness."""


def open_source(state_dir: Path | None, kubeconfig: str | None) -> Source:
    """The state source a daemon was configured with: a state directory (`--state-dir`, the
    lab's manifest mode) or the Kubernetes API (`--kubeconfig PATH`, or `in-cluster` for the
    pod's service account)."""
    if (state_dir is None) == (kubeconfig is None):
        raise ValueError("give exactly one state source: --state-dir DIR or --kubeconfig PATH")
    if kubeconfig is None:
        from veil.runtime.sources.manifests import ManifestSource  # noqa: PLC0415

        assert state_dir is not None
        return ManifestSource(state_dir)
    from veil.runtime.sources.kubernetes import KubernetesSource  # noqa: PLC0415

    return KubernetesSource(kube_client(kubeconfig))


def kube_config(kubeconfig: str) -> Any:
    """A kubeconfig file, or `in-cluster` (the pod's service account token, CA bundle and
    KUBERNETES_SERVICE_HOST)."""
    from lightkube import KubeConfig  # noqa: PLC0415

    if kubeconfig == IN_CLUSTER:
        return KubeConfig.from_service_account()
    return KubeConfig.from_file(str(kubeconfig))


def kube_client(kubeconfig: str) -> Any:
    """A lightkube AsyncClient (what the daemons' trio tasks use)."""
    from lightkube import AsyncClient  # noqa: PLC0415

    return AsyncClient(config=kube_config(kubeconfig), field_manager="veil")


def kube_sync_client(kubeconfig: str) -> Any:
    """A blocking lightkube Client, for a daemon's start-up (before it serves)."""
    from lightkube import Client  # noqa: PLC0415

    return Client(config=kube_config(kubeconfig), field_manager="veil")
