#!/usr/bin/env bash
# The control-plane node: k3s server (flannel as the primary CNI, no Traefik), nodes
# registered with Veil's startup taint (docs/install.md), the join token shared with workers.
set -euo pipefail
ip=$1
curl -sfL https://get.k3s.io | INSTALL_K3S_EXEC="server \
  --node-ip=${ip} --flannel-iface=eth1 --disable=traefik --write-kubeconfig-mode=0644 \
  --kubelet-arg=register-with-taints=veil.dev/not-ready=true:NoSchedule" sh -
install -m 0600 /var/lib/rancher/k3s/server/node-token /veil/vagrant/.node-token
echo "k3s server up on ${ip}"
