"""Workload identity: SPIFFE IDs, keys and CSRs, the certificate manager and TLS contexts.

Every tunnel in the mesh is mutual TLS between SPIFFE identities
`spiffe://<trust-domain>/ns/<namespace>/sa/<service account>`. The agent (and later the
waypoint) asks the mesh CA for one certificate per identity it serves, verifies what comes
back, refreshes it at half life and hands out `ssl.SSLContext`s. Python's ssl module does not
check URI SANs, so `tls.verify_peer` does it after every handshake.
"""
