"""Enrollment when capture cannot work at all: the pod is never reported enrolled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.capture.modes import CaptureTarget
from agent.enrollment import EnrollError, Enrollment, cgroup_path
from agent.state.model import Workload


class RecordingCapture:
    mode = "ebpf"

    def __init__(self) -> None:
        self.installed: list[CaptureTarget] = []

    def start(self) -> None: ...

    def install(self, t: CaptureTarget) -> None:
        self.installed.append(t)

    def remove(self, t: CaptureTarget) -> None: ...

    def forget_others(self) -> None: ...

    def close(self) -> None: ...

    def counters(self) -> dict[str, int]:
        return {}


POD = Workload(
    "mesh",
    "client",
    "node1",
    "client",
    ip="10.244.1.10",
    annotations={"lab.veil.dev/cgroup": "/sys/fs/cgroup/unified/veil/lab/pods/mesh_client"},
)


async def test_broken_capture_refuses_every_enrollment_with_its_cause(tmp_path: Path) -> None:
    capture = RecordingCapture()
    ctx: Any = object()  # never reached: the refusal comes first
    e = Enrollment(ctx, tmp_path, capture)
    e.capture_broken = "eBPF capture needs kernel BTF (...): use --capture iptables"
    with pytest.raises(EnrollError, match="ebpf capture is unavailable: eBPF capture needs"):
        await e._enroll(POD, "/run/netns/x", "10.244.1.10")
    assert e.pods == {} and capture.installed == []
    assert not (tmp_path / "pods.json").exists()


def test_the_pod_cgroup_comes_from_the_pod() -> None:
    assert cgroup_path(POD).endswith("/pods/mesh_client")
    assert cgroup_path(Workload("a", "b", "n", "sa")) == ""
