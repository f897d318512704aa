#!/usr/bin/env bash
# Gateway API CRDs, Veil's chart (k3s keeps its CNI files in its own dirs), the shop demo.
set -euo pipefail
capture=${1:-iptables}
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
kubectl() { k3s kubectl "$@"; }
command -v helm >/dev/null || curl -fsSL https://raw.githubusercontent.com/helm/helm/main/scripts/get-helm-3 | bash
kubectl apply --server-side -f \
  https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.6.3/experimental-install.yaml
helm upgrade --install veil /veil/deploy/chart/veil --namespace veil-system --create-namespace \
  --set image.tag=dev --set image.pullPolicy=Never --set agent.capture="${capture}" \
  --set agent.cni.binDir=/var/lib/rancher/k3s/data/current/bin \
  --set agent.cni.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d \
  --wait --timeout 10m
kubectl -n veil-system rollout status daemonset/veil-agent --timeout=5m
# The lab's `veil/echo` pods run `veil echo`; busybox is pulled from Docker Hub.
kubectl apply -f /veil/examples/shop/
kubectl -n shop wait --for=condition=Available deployment --all --timeout=5m
echo "Veil (${capture} capture) and the shop demo installed"
