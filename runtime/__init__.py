"""The trio side every Veil process shares: HBONE over sockets, TLS and certificates, the
state store and its sources, admin HTTP, metrics, the per-connection barrier.

The roles (`veil.agent`, `veil.waypoint`, `veil.ca`) build on this and on `veil.core`, never
on each other's internals.
"""
