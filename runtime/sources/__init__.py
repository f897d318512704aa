"""Cluster state sources: the one way state flows is sources -> one immutable MeshState
snapshot -> consumers.

A source (`manifests.ManifestSource` over the lab's state directory; a Kubernetes source
behind the same interface) turns what it reads into events for `veil.core.state.StateBuilder`,
which builds each new snapshot; the single writer, `veil.runtime.store.StateStore.update()`,
swaps it in. Consumers (the CA's authorizer, the certificate manager, capture, proxies,
policy) only read `store.current` and wait for newer versions; nothing reaches around it.
"""
