"""veil-cni: the chained CNI plugin, and the agent endpoint it talks to (a unix socket)."""
