"""iptables capture in a scratch netns: a failed install leaves nothing behind."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from veil.agent.capture import iptables
from veil.agent.capture.base import CaptureError, CaptureTarget
from veil.agent.capture.modes import IptablesCapture


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"veil-tcap-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def rules_in(netns: str) -> list[str]:
    saved = iptables.save(netns) + iptables.save6(netns)
    return [line for line in saved.splitlines() if line.startswith("-A")]


def test_a_failed_install_leaves_no_rule_behind(netns, monkeypatch):
    """The IPv6 refusal goes in first; when the IPv4 rules then fail, it must come out again
    (a pod that is not enrolled keeps its network as it was)."""
    real = iptables.run_in

    def ipv4_restore_fails(path: str, argv: list[str], stdin: str | None = None) -> str:
        if argv[0] == "iptables-restore" and stdin and "REDIRECT" in stdin:
            raise CaptureError("iptables-restore failed (injected)")
        return real(path, argv, stdin)

    monkeypatch.setattr(iptables, "run_in", ipv4_restore_fails)
    with pytest.raises(CaptureError, match="injected"):
        IptablesCapture().install(CaptureTarget(netns, "", "10.9.0.2"))
    monkeypatch.undo()
    assert rules_in(netns) == []


def test_install_twice_then_remove_restores_the_netns(netns):
    before = rules_in(netns)
    cap = IptablesCapture()
    target = CaptureTarget(netns, "", "10.9.0.2")
    cap.install(target)
    once = rules_in(netns)
    cap.install(target)
    assert rules_in(netns) == once
    assert any("VEIL-INPUT" in line for line in once)  # the IPv6 refusal is in
    cap.remove(target)
    assert rules_in(netns) == before
