"""The waypoint (`veil waypoint run`): a namespace's L7 proxy. Built on `veil.core` and
`veil.runtime`; never imports the agent, the CA or the lab."""
