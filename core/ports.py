"""The port and mark contract (design.md section 3 and 6): the one place these numbers live.

Capture rules (`veil.agent.capture.rules`), the eBPF programs (`ebpf/include/veil.h`, checked
against this module by tests/unit/test_port_contract.py), the node proxy, the waypoint and the
CA all read them from here.
"""

from __future__ import annotations

# The agent's listeners in every enrolled pod
OUTBOUND_PORT = 15001  # the app's captured outbound TCP (127.0.0.1)
INBOUND_PLAIN_PORT = 15006  # inbound TCP from outside the mesh
HBONE_PORT = 15008  # HBONE: HTTP/2 CONNECT over mutual TLS
# The agent's listeners in every enrolled pod: never a destination the agent connects to for
# a client (it would be connecting to itself, and each such connection makes the next one).
AGENT_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT})

# Each process's own endpoints
ADMIN_PORT = 15000  # admin and config dump, node localhost only
METRICS_PORT = 15020  # Prometheus metrics (agent, waypoint)
READY_PORT = 15021  # readiness
CA_PORT = 15012  # the mesh CA's TLS API
CA_METRICS_PORT = 15014  # the CA's metrics

# Marks and routing of capture
AGENT_MARK = 0x539  # SO_MARK of every agent socket: never recaptured
CONN_MARK = 0x111  # set on connections the agent opened; restored on the app's replies
MARK_MASK = 0xFFF
PROBE_SOURCE = "169.254.7.127"  # kubelet health probes arrive SNATed from here
ROUTE_TABLE = 100
RULE_PRIORITY = 32764
