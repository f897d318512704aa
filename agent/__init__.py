"""The node agent (`veil agent run`): captures enrolled pods' traffic, carries it in HBONE,
enforces L4 policy. Built on `veil.core` and `veil.runtime`; never imports the waypoint, the
CA or the lab."""
