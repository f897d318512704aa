"""Where the lab finds the upstream control plane (kube-apiserver, kube-controller-manager,
kube-scheduler, kubectl, etcd, helm): built by scripts/build-upstream.sh from the versions
upstream/go.mod pins, into `${VEIL_CACHE:-~/.cache/veil}/kubernetes/<version>/bin`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from veil.agent.check import Check

ROOT = Path(__file__).resolve().parents[1]
GO_MOD = ROOT / "upstream" / "go.mod"
BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "etcd",
    "helm",
)
GATEWAY_API = "v1.6.3"  # the release whose CRDs (experimental channel) the lab installs
BUILD = "make upstream (scripts/build-upstream.sh; about 10 minutes the first time)"


def pinned(module: str = "k8s.io/kubernetes", go_mod: Path = GO_MOD) -> str | None:
    """The version upstream/go.mod requires of a module."""
    found = re.search(rf"^\s*{re.escape(module)} (v\S+)", go_mod.read_text(), re.M)
    return found.group(1) if found else None


def cache_dir() -> Path:
    if os.environ.get("VEIL_CACHE"):
        return Path(os.environ["VEIL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "veil"


def bin_dir() -> Path:
    return cache_dir() / "kubernetes" / (pinned() or "unknown") / "bin"


def gateway_crds() -> Path:
    """Gateway API's CRDs (experimental channel: the standard one plus HTTPRoute retries and
    the like), as the build script copied them from the release's Go module."""
    return cache_dir() / "kubernetes" / f"gateway-api-{GATEWAY_API}-experimental"


def h2spec() -> Path | None:
    """h2spec as scripts/build-upstream.sh built it (from tools/h2spec), if it did."""
    import hashlib  # noqa: PLC0415

    go_sum = ROOT / "tools" / "h2spec" / "go.sum"
    if not go_sum.exists():
        return None
    digest = hashlib.sha256(go_sum.read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"h2spec-{digest}" / "h2spec"
    return path if os.access(path, os.X_OK) else None


def missing() -> list[str]:
    d = bin_dir()
    gone = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
    if not (gateway_crds() / ".done").exists():
        gone.append(f"Gateway API {GATEWAY_API} CRDs")
    return gone


def check() -> Check:
    """For `veil check`: the binaries of the kubernetes mode, and how to build them."""
    if not GO_MOD.exists():
        return Check("upstream binaries", False, f"{GO_MOD} not found", "run from a Veil checkout")
    gone = missing()
    where = bin_dir()
    if not gone:
        return Check("upstream binaries", True, f"Kubernetes {pinned()}, etcd, helm in {where}")
    return Check("upstream binaries", False, f"missing in {where}: {', '.join(gone)}", BUILD)
