"""vagrant/ cannot run here (no virtualization): check what can be checked without it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"
SCRIPTS = sorted((VAGRANT / "provision").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_provisioning_script_parses_and_stops_on_errors(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


def test_the_vagrantfile_names_only_scripts_that_exist() -> None:
    named = re.findall(r'path: "(provision/[^"]+)"', (VAGRANT / "Vagrantfile").read_text())
    assert named and all((VAGRANT / n).is_file() for n in named)
    assert {VAGRANT / n for n in named} == set(SCRIPTS)


def test_the_chart_values_the_install_sets_exist() -> None:
    values = yaml.safe_load((ROOT / "deploy/chart/veil/values.yaml").read_text())
    install = (VAGRANT / "provision/install-veil.sh").read_text()
    for key in re.findall(r"--set ([\w.]+)=", install):
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not a chart value"
            node = node[part]


def test_the_shop_client_is_pinned_to_a_node_the_cluster_has() -> None:
    pinned = re.findall(r"nodeName: (\w+)", (ROOT / "examples/shop/10-shop.yaml").read_text())
    nodes = re.findall(r'name: "(node\d)"', (VAGRANT / "Vagrantfile").read_text())
    assert set(pinned) <= set(nodes)
