"""The capture modes behind one interface (`capture/base.py`): the agent enrolls pods the same
way in both."""

from __future__ import annotations

import contextlib
from pathlib import Path

from veil.agent.capture import iptables
from veil.agent.capture.base import Capture, CaptureError, CaptureTarget

MODES = ("iptables", "ebpf")


class IptablesCapture:
    mode = "iptables"
    # Pods a reconcile changes at once: a rule change spends most of its time waiting for
    # the kernel's commit (removing a pod's chains: ~30 ms, little of it CPU), and pods'
    # netns are independent. eBPF capture has no such attribute: one at a time (its
    # programs and maps are shared by every pod).
    concurrency = 8

    def start(self) -> None:
        pass

    def install(self, t: CaptureTarget) -> None:
        try:
            iptables.install(t.netns)
        except CaptureError:
            with contextlib.suppress(CaptureError):
                iptables.remove(t.netns)  # e.g. the IPv6 refusal went in, the IPv4 rules did not
            raise

    def remove(self, t: CaptureTarget) -> None:
        if Path(t.netns).exists():  # a pod that is gone took its rules with it
            iptables.remove(t.netns)

    def forget_others(self) -> None:
        pass

    def close(self, handed_over: bool = False) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}


def make(mode: str, pin_dir: Path | None = None) -> Capture:
    if mode == "iptables":
        return IptablesCapture()
    if mode == "ebpf":
        from veil.agent.capture.ebpf import DEFAULT_PIN_DIR, EbpfCapture  # noqa: PLC0415

        return EbpfCapture(pin_dir or DEFAULT_PIN_DIR)
    raise ValueError(f"unknown capture mode {mode!r}: use one of {', '.join(MODES)}")
