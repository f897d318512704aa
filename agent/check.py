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

from veil.agent.capture import cgroup2


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
        root = cgroup2.root()
    except cgroup2.CgroupError as e:
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


def _veil_programs_load() -> Check:
    """Veil's own programs through bcc and the verifier: only the kernel can say yes for sure."""
    import secrets  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from veil.agent.capture import ebpf  # noqa: PLC0415
    from veil.agent.capture.base import CaptureError  # noqa: PLC0415

    name = "Veil's eBPF programs compile and load"
    cap = ebpf.EbpfCapture(pin_dir=ebpf.BPFFS / f"veil-check-{secrets.token_hex(3)}")
    try:
        cap.load()
    except CaptureError as e:
        return Check(name, False, str(e).split(" (")[0], "see the message: " + str(e)[-200:])
    finally:
        cap.close()
        shutil.rmtree(cap.pin_dir, ignore_errors=True)
    return Check(name, True, ", ".join(p.function for p in ebpf.PROGRAMS.values()) + " accepted")


LAB = (
    _root,
    _tool("ip", "iproute2"),
    _tool("nsenter", "util-linux"),
    _cni,
    _cgroup2,
    _tool("curl", "curl"),
)
IPTABLES = (
    _tool("iptables-restore", "iptables"),
    _tool("iptables-save", "iptables"),
    _tool("ip6tables-restore", "iptables"),
    _tool("ip6tables-save", "iptables"),
)
EBPF = (_cgroup2, _btf, _headers, _veil_programs_load)


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
