#!/usr/bin/env bash
# Build Veil's image from the synced checkout on this node and hand it to k3s's containerd
# (no registry needed). The shop demo's `veil/echo` is the same image.
set -euo pipefail
cd /veil
docker build -q -f deploy/Dockerfile -t ghcr.io/veil-dev/veil:dev -t veil/echo:latest .
docker save ghcr.io/veil-dev/veil:dev veil/echo:latest | k3s ctr images import - >/dev/null
echo "image ghcr.io/veil-dev/veil:dev imported on $(hostname)"
