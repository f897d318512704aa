"""Veil, a sidecarless (ambient) service mesh: the one import package.

Each subpackage is one of the repository's top-level folders (linked here, so that the folder
list is the architecture): `core` (pure protocol and state logic), `runtime` (the trio I/O
every process shares), `agent` (the node agent), `waypoint` (the L7 proxy), `ca` (the mesh
CA), `controller` (the waypoint controller on Kubernetes) and `lab` (the local lab). `cli` is
the `veil` command that starts any of them.
"""
