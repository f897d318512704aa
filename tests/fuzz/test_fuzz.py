"""A short pass of every fuzz harness (tests/fuzz/harnesses.py) in `make test`: each runs
coverage-guided for a few seconds and must find nothing. `make fuzz` runs them for longer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harnesses import HARNESSES

ROOT = Path(__file__).parents[2]
SECONDS = int(os.environ.get("VEIL_FUZZ_SECONDS", "4"))


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_fuzz_briefly(name: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.harnesses",
            name,
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SECONDS + 60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
