"""What every capture mode (iptables rules, eBPF programs) is: its interface, what it
captures, and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class CaptureError(RuntimeError):
    """Capture could not be installed or removed; the pod must not be reported enrolled."""


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

    def close(self, handed_over: bool = False) -> None:
        """The agent exits; `handed_over`: a successor runs with the same hooks (leave them)."""

    def counters(self) -> dict[str, int]: ...
