#!/usr/bin/env bash
# Installs the Debian packages Veil's lab and tests need, and the kernel-header links bcc
# compiles against here. Idempotent: when everything is in place it only checks and exits.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-system: must run as root (the lab creates network namespaces and iptables rules)" >&2
  exit 1
fi

# command-or-file:package pairs; a package is installed only when its marker is missing.
needs=(
  "/usr/sbin/iptables:iptables"
  "/usr/lib/cni/ptp:containernetworking-plugins"
  "/usr/lib/python3/dist-packages/bcc/__init__.py:python3-bpfcc"
  "/usr/bin/nsenter:util-linux"
  "/usr/bin/curl:curl"
  "/usr/sbin/ip:iproute2"
  "/usr/bin/pgrep:procps"
  "/usr/bin/openssl:openssl"
  "/usr/bin/h2load:nghttp2-client"
  "/usr/bin/gcc:gcc"
  "/usr/lib/x86_64-linux-gnu/libc.a:libc6-dev"
  "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1:libfaketime"
)
missing=()
for pair in "${needs[@]}"; do
  marker=${pair%%:*}; pkg=${pair##*:}
  [ -e "$marker" ] || missing+=("$pkg")
done
if ! compgen -G "/usr/src/linux-headers-*-amd64" >/dev/null; then
  missing+=("linux-headers-amd64")
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. This kernel ships no headers of
# its own; Debian's newest linux-headers-*-amd64 (and its -common twin) serve for tc programs.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build" ] || [ ! -e "$kdir/source" ]; then
  amd64=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common=${amd64%-amd64}-common
  mkdir -p "$kdir"
  [ -e "$kdir/build" ] || ln -sfn "$amd64" "$kdir/build"
  [ -e "$kdir/source" ] || ln -sfn "$common" "$kdir/source"
  echo "setup-system: linked $kdir/build -> $amd64, $kdir/source -> $common"
fi
