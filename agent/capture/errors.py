"""The error every capture mode raises (iptables rules, eBPF programs)."""

from __future__ import annotations


class CaptureError(RuntimeError):
    """Capture could not be installed or removed; the pod must not be reported enrolled."""
