"""`veil ca`: the mesh certificate authority (port 15012, TLS, JSON over HTTP/1.1).

A node agent authenticates with its node credential and may obtain certificates only for
identities that have a workload scheduled on its node in the current cluster state. See
docs/ca.md for the API.
"""
