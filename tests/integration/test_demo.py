"""The README's first command, in both lab modes: `make demo` (manifest mode), `make demo
KUBE=1` (the real control plane, the lab as kubelet) and `make demo CHART=1` (the same, Veil
installed by `helm install`) end with no unexpected result."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.lab import leftovers, new_lab_name
from veil.lab import upstream

KUBE = pytest.mark.skipif(bool(upstream.missing()), reason="the upstream binaries are not built")


@pytest.mark.parametrize(
    "mode",
    ["manifests", pytest.param("kubernetes", marks=KUBE), pytest.param("chart", marks=KUBE)],
)
def test_the_demo_passes(mode):
    name = new_lab_name()
    argv = [sys.executable, "-m", "veil.lab.demo", "--name", name]
    proc = subprocess.run(
        [*argv, *([] if mode == "manifests" else [f"--{mode}"])],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "== summary: 0 unexpected results" in proc.stdout
    assert leftovers(name) == []
