"""Capture: redirect an enrolled pod's TCP traffic to the agent, inside the pod's netns.

iptables mode (design section 6): nat OUTPUT sends the app's outbound TCP to 15001, nat
PREROUTING sends inbound TCP (except to 15008) to 15006; the agent's own sockets carry
SO_MARK 0x539 and are never redirected; a connmark (0x111) restores a mark on the app's
replies to the agent's spoofed-source connections so `ip rule fwmark 0x111 lookup 100` +
`local 0/0 dev lo table 100` deliver them back to the agent. Kubelet probes from
169.254.7.127 pass untouched. `rules.py` computes everything (pure); `iptables.py` applies it.
"""
