#!/usr/bin/env bash
# The smoke test: no node keeps the startup taint, every agent is ready, the shop's running
# pods are captured once their namespace is labelled, and a request is answered in the mesh.
set -euo pipefail
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
kubectl() { k3s kubectl "$@"; }
fail() { echo "SMOKE FAIL: $*" >&2; exit 1; }

taints=$(kubectl get nodes -o jsonpath='{range .items[*]}{.spec.taints[*].key}{"\n"}{end}')
grep -q veil.dev/not-ready <<<"$taints" && fail "a node still has veil.dev/not-ready"
ready=$(kubectl -n veil-system get ds veil-agent -o jsonpath='{.status.numberReady}')
[ "$ready" = 3 ] || fail "agents ready: $ready of 3"

# Enroll the shop's running pods (no restart: the agents find them on the hosts).
kubectl label namespace shop veil.dev/dataplane-mode=ambient --overwrite >/dev/null
kubectl -n shop wait --for=condition=Ready pod/client --timeout=2m >/dev/null
sleep 5
out=$(kubectl -n shop exec client -- wget -qO- -T 5 http://frontend.shop/ || true)
grep -q '"pod"' <<<"$out" || fail "client -> frontend.shop answered: ${out:-nothing}"
echo "ok: client -> frontend.shop through the mesh"

captured=0
for agent in $(kubectl -n veil-system get pods -l app.kubernetes.io/name=veil-agent -o name); do
  if kubectl -n veil-system logs "$agent" | grep -q "enrolled shop/"; then
    echo "ok: $agent captured shop pods"
    captured=$((captured + 1))
  fi
done
[ "$captured" -ge 1 ] || fail "no agent captured a shop pod"
echo "SMOKE OK: 3 nodes, agents ready, shop pods captured, mesh traffic answered"
