"""The local lab: network namespaces as nodes and pods, wired with the real CNI plugins,
running the real CA, agents and waypoints (`veil lab ...`). Nothing in the product imports it;
only the `veil` command does."""
