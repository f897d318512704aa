#!/usr/bin/env bash
# Every node: packages to build Veil's image and run k3s; the kernel settings Veil needs.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends curl ca-certificates docker.io iptables
# A pod's ambient capture runs in the pod's own netns; nothing to change on the host except
# letting routed traffic through (k3s sets the rest).
sysctl -w net.ipv4.ip_forward=1 >/dev/null
echo "node $(hostname) ($1): packages in place"
