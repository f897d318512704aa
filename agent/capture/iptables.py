"""Apply and remove iptables capture in a pod netns (the I/O around rules.py)."""

from __future__ import annotations

import subprocess

from veil.agent.capture import rules
from veil.agent.capture.base import CaptureError
from veil.agent.capture.netns import NetNs
from veil.core import ports


def run_in(netns_path: str, argv: list[str], stdin: str | None = None) -> str:
    """Run a tool in a pod's netns. The calling thread enters it for the fork (a child starts
    in its parent thread's netns) and comes straight back: no `nsenter` in between, whose
    exec made every command ~2.4x dearer (5.3 ms against 2.2 ms for an `iptables-save`)."""
    try:
        ns = NetNs(netns_path)
    except OSError as e:
        raise CaptureError(f"{' '.join(argv)}: {e}") from None
    try:
        with ns.entered():
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=15, check=False
            )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaptureError(f"{' '.join(argv)} in {netns_path}: {e}") from None
    finally:
        ns.close()
    if proc.returncode != 0:
        raise CaptureError(
            f"{' '.join(argv)} in {netns_path} failed: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def save(netns_path: str) -> str:
    return run_in(netns_path, ["iptables-save"])


def save6(netns_path: str) -> str:
    return run_in(netns_path, ["ip6tables-save"])


def install(netns_path: str) -> None:
    """Idempotent: rules present exactly once, policy routing in place. IPv6 TCP is refused
    first: there is no moment when the pod's IPv4 is captured and its IPv6 leaves in clear."""
    script6 = rules.install_script(save6(netns_path), rules.IPV6)
    run_in(netns_path, ["ip6tables-restore", "--noflush"], script6)
    run_in(netns_path, ["iptables-restore", "--noflush"], rules.install_script(save(netns_path)))
    install_routing(netns_path)


def install_routing(netns_path: str) -> None:
    """Policy routing that delivers the app's replies of spoofed connections to the agent."""
    for cmd in rules.route_commands():
        run_in(netns_path, ["ip", *cmd])
    if rules.rule_args()[1] not in run_in(netns_path, ["ip", "rule", "show"]):
        run_in(netns_path, ["ip", "rule", "add", *rules.rule_args()])


def remove(netns_path: str) -> None:
    """Remove every trace of capture; the rest of the netns is left as it was."""
    script = rules.remove_script(save(netns_path))
    if script:
        run_in(netns_path, ["iptables-restore", "--noflush"], script)
    script6 = rules.remove_script(save6(netns_path), rules.IPV6)
    if script6:
        run_in(netns_path, ["ip6tables-restore", "--noflush"], script6)
    remove_routing(netns_path)


def remove_routing(netns_path: str) -> None:
    shown = run_in(netns_path, ["ip", "rule", "show"])
    for _ in range(shown.count(f"lookup {ports.ROUTE_TABLE}")):
        run_in(netns_path, ["ip", "rule", "del", *rules.rule_args()])
    run_in(netns_path, ["ip", "route", "flush", "table", str(ports.ROUTE_TABLE)])
