"""The README's first command, in both lab modes: `make demo` (manifest mode) and `make demo
KUBE=1` (the real control plane, the lab as kubelet) end with no unexpected result."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.lab import leftovers, new_lab_name
from veil.lab import upstream


@pytest.mark.parametrize(
    "kubernetes",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                bool(upstream.missing()), reason="the upstream binaries are not built"
            ),
        ),
    ],
    ids=["manifests", "kubernetes"],
)
def test_the_demo_passes(kubernetes):
    name = new_lab_name()
    argv = [sys.executable, "-m", "veil.lab.demo", "--name", name]
    proc = subprocess.run(
        [*argv, *(["--kubernetes"] if kubernetes else [])],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "== summary: 0 unexpected results" in proc.stdout
    assert leftovers(name) == []
