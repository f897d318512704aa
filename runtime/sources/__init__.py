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


def kube_client(kubeconfig: str) -> Any:
    """A lightkube AsyncClient from a kubeconfig file, or `in-cluster` (the pod's service
    account token, CA bundle and KUBERNETES_SERVICE_HOST)."""
    from lightkube import AsyncClient, KubeConfig  # noqa: PLC0415

    config = (
        KubeConfig.from_service_account()
        if kubeconfig == IN_CLUSTER
        else KubeConfig.from_file(str(kubeconfig))
    )
    return AsyncClient(config=config, field_manager="veil")
