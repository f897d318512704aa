"""Veil's shared core: protocol and state logic with no I/O, used by every role.

The HBONE codec (`hbone`), the port and mark contract (`ports`), the typed cluster state
(`state`), authorization (`authz`), SPIFFE identities and certificate checks (`spiffe`,
`certs`, `csr`) and the small parsers they share. Nothing here opens a socket, starts a task
or reads a file: each module is a pure function or a state machine, unit-tested without I/O,
as h2 and h11 are. The roles (`veil.agent`, `veil.waypoint`, `veil.ca`) drive them.
"""
