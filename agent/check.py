"""`veil check`: can this machine run the lab, iptables capture and eBPF capture? And if not,
what is missing and how to fix it. Every check is a small function returning a `Check`; the
eBPF checks end with a real compile-and-load of a tc program through bcc, since only the
kernel's verifier can say yes for certain.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.lab import cgroups


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _root() -> Check:
    ok = os.geteuid() == 0
    return Check(
        "root",
        ok,
        "running as root" if ok else f"running as uid {os.geteuid()}",
        "" if ok else "run with sudo: network namespaces, iptables and eBPF need root",
    )


def _tool(name: str, package: str) -> Callable[[], Check]:
    def check() -> Check:
        path = shutil.which(name)
        return Check(
            name,
            path is not None,
            path or "not found",
            "" if path else f"apt-get install {package} (or: make setup)",
        )

    return check


def _cni() -> Check:
    missing = [
        p
        for p in ("ptp", "host-local", "loopback")
        if not any(Path(d, p).exists() for d in ("/usr/lib/cni", "/opt/cni/bin"))
    ]
    return Check(
        "CNI plugins",
        not missing,
        "ptp, host-local, loopback found" if not missing else f"missing: {', '.join(missing)}",
        "" if not missing else "apt-get install containernetworking-plugins",
    )


def _cgroup2() -> Check:
    try:
        root = cgroups.root()
    except cgroups.CgroupError as e:
        return Check(
            "cgroup v2",
            False,
            str(e),
            "mount cgroup2 (needed for per-pod groups and eBPF cgroup programs)",
        )
    return Check("cgroup v2", True, f"mounted at {root}")


def _btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return Check(
        "kernel BTF",
        ok,
        "/sys/kernel/btf/vmlinux" if ok else "not found",
        "" if ok else "a kernel built with CONFIG_DEBUG_INFO_BTF",
    )


def _headers() -> Check:
    build = Path(f"/lib/modules/{platform.release()}/build")
    ok = build.exists()
    return Check(
        "kernel headers for bcc",
        ok,
        f"{build} -> {build.resolve()}" if ok else f"{build} missing",
        "" if ok else "apt-get install linux-headers-amd64 and link it (make setup)",
    )


def _bcc_compiles() -> Check:
    try:
        from bcc import BPF  # noqa: PLC0415 - only when asked to check eBPF
    except ImportError as e:
        return Check(
            "bcc compiles and loads a tc program",
            False,
            f"import bcc: {e}",
            "apt-get install python3-bpfcc and link it into the venv (make setup)",
        )
    try:
        prog = BPF(text="int veil_check(struct __sk_buff *skb) { return 0; }")
        prog.load_func("veil_check", BPF.SCHED_CLS)
        prog.cleanup()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Check(
            "bcc compiles and loads a tc program",
            False,
            first,
            "see the compiler or verifier message above",
        )
    return Check("bcc compiles and loads a tc program", True, "the verifier accepted it")


LAB = (
    _root,
    _tool("ip", "iproute2"),
    _tool("nsenter", "util-linux"),
    _cni,
    _cgroup2,
    _tool("curl", "curl"),
)
IPTABLES = (_tool("iptables-restore", "iptables"), _tool("iptables-save", "iptables"))
EBPF = (_btf, _headers, _bcc_compiles)


def run(ebpf: bool = True) -> dict[str, list[Check]]:
    out = {"lab": [c() for c in LAB], "iptables capture": [c() for c in IPTABLES]}
    if ebpf:
        out["eBPF capture"] = [c() for c in EBPF]
    return out


def format_report(report: dict[str, list[Check]]) -> str:
    lines = []
    for section, checks in report.items():
        verdict = "ready" if all(c.ok for c in checks) else "NOT ready"
        lines.append(f"{section}: {verdict}")
        for c in checks:
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
            if c.fix:
                lines.append(f"         fix: {c.fix}")
    return "\n".join(lines)
