"""Thin wrappers over ip(8), iptables-restore(8) and nsenter(1) for the lab's namespaces.

Every call names its netns explicitly; nothing here ever touches the machine's root network
namespace, which is how the lab keeps its traffic inside itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class CommandError(RuntimeError):
    """A system command failed; carries what it said so the user sees the kernel's reason."""


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: command not found (run `make setup` as root)") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise CommandError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {msg}")
    return proc


def path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def listing() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def delete(name: str) -> None:
    if exists(name):
        run(["ip", "netns", "delete", name], check=False)
    # A netns whose bind mount is gone but whose file remains (crash mid-delete).
    if exists(name):
        path(name).unlink(missing_ok=True)


def ip(name: str, *args: str) -> str:
    return run(["ip", "-n", name, *args]).stdout


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """Run argv in the netns with /etc/netns/<name>/* bind-mounted over /etc (ip netns exec)."""
    return ["ip", "netns", "exec", name, *argv]


def nsenter_argv(name: str, argv: Sequence[str]) -> list[str]:
    """Run argv in the netns only (no mount namespace), as a CNI runtime runs plugins."""
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def sysctl(name: str, key: str, value: str) -> None:
    run(exec_argv(name, ["sysctl", "-qw", f"{key}={value}"]))


def iptables_restore(name: str, rules: str) -> None:
    run(exec_argv(name, ["iptables-restore"]), input=rules)


def pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def parse_proc_net_tcp(text: str) -> set[int]:
    """Ports in LISTEN state (st 0A) from /proc/<pid>/net/tcp or tcp6 text."""
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_ports(pid: int) -> set[int]:
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            ports |= parse_proc_net_tcp(Path(f"/proc/{pid}/net/{name}").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return ports
