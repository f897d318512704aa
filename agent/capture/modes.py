"""The capture modes behind one interface: the agent enrolls pods the same way in both."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.capture import iptables
from agent.capture.errors import CaptureError

MODES = ("iptables", "ebpf")


@dataclass(frozen=True)
class CaptureTarget:
    netns: str  # path of the pod's netns
    cgroup: str  # path of the pod's cgroup v2 group ("" if unknown)
    ip: str


class Capture(Protocol):
    mode: str

    def start(self) -> None:
        """Prepare the mode once per agent; CaptureError names the cause and the fix."""

    def install(self, t: CaptureTarget) -> None:
        """Idempotent; CaptureError leaves nothing half-installed."""

    def remove(self, t: CaptureTarget) -> None: ...

    def forget_others(self) -> None:
        """After resuming the registry: drop state of pods that are not enrolled any more."""

    def close(self) -> None: ...

    def counters(self) -> dict[str, int]: ...


class IptablesCapture:
    mode = "iptables"

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

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}


def make(mode: str, pin_dir: Path | None = None) -> Capture:
    if mode == "iptables":
        return IptablesCapture()
    if mode == "ebpf":
        from agent.capture.ebpf import DEFAULT_PIN_DIR, EbpfCapture  # noqa: PLC0415

        return EbpfCapture(pin_dir or DEFAULT_PIN_DIR)
    raise ValueError(f"unknown capture mode {mode!r}: use one of {', '.join(MODES)}")
