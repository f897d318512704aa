"""Cluster state, flowing one way: sources -> one immutable MeshState snapshot -> consumers.

Sources (`sources.manifests.ManifestSource` over the lab's state directory; a Kubernetes
source later, behind the same interface) convert what they read into a new `MeshState` with
`model.build_state()`, and hand it to the single writer, `store.StateStore.update()`.
Consumers (the CA's authorizer, the certificate manager, capture, proxies, policy) only read
`store.current` and wait for newer versions; nothing reaches around the snapshot.
"""
