#!/usr/bin/env bash
# A worker: k3s agent joining the server, with Veil's startup taint.
set -euo pipefail
server=$1 ip=$2
for _ in $(seq 60); do [ -s /veil/vagrant/.node-token ] && break; sleep 5; done
curl -sfL https://get.k3s.io | K3S_URL="https://${server}:6443" \
  K3S_TOKEN="$(cat /veil/vagrant/.node-token)" INSTALL_K3S_EXEC="agent \
  --node-ip=${ip} --flannel-iface=eth1 \
  --kubelet-arg=register-with-taints=veil.dev/not-ready=true:NoSchedule" sh -
echo "k3s agent ${ip} joined ${server}"
