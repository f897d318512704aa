"""The CNI installer (issue 21, item 3): veil-cni chained into the primary CNI's list, kept
there when the primary rewrites it, removed on uninstall; and the node's startup taint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from veil.agent import node
from veil.agent.cni import install

PLUGIN = {"type": "veil-cni", "agentSocket": "/var/run/veil/cni.sock"}
PTP = {"type": "ptp", "ipam": {"type": "host-local"}}
PRIMARY = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [PTP, {"type": "portmap"}]}


def test_the_primary_is_the_first_config_file_by_name():
    names = ["20-b.conflist", "10-a.conf", "README", ".10-a.conflist.veil-tmp", "05-x.json~"]
    assert install.primary(names) == "10-a.conf"
    assert install.primary(["README"]) is None


def test_veil_is_chained_last_exactly_once():
    doc = install.chained(PRIMARY, PLUGIN)
    assert doc is not None and doc["plugins"] == [PTP, {"type": "portmap"}, PLUGIN]
    assert install.chained(doc, PLUGIN) is None  # already so: no write
    moved = {**PRIMARY, "plugins": [PLUGIN, PTP]}  # somewhere else, or stale settings
    assert install.chained(moved, PLUGIN)["plugins"] == [PTP, PLUGIN]  # type: ignore[index]
    stale = {**PRIMARY, "plugins": [PTP, {**PLUGIN, "agentSocket": "/old"}]}
    assert install.chained(stale, PLUGIN)["plugins"] == [PTP, PLUGIN]  # type: ignore[index]


def test_a_single_plugin_conf_becomes_a_list():
    conf = {"cniVersion": "0.4.0", "name": "net", **PTP}
    assert install.chained(conf, PLUGIN) == {
        "cniVersion": "0.4.0",
        "name": "net",
        "plugins": [PTP, PLUGIN],
    }


def test_unchained_removes_only_veil():
    doc = install.chained(PRIMARY, PLUGIN)
    assert doc is not None
    assert install.unchained(doc) == PRIMARY
    assert install.unchained(PRIMARY) is None


def installer(tmp_path: Path) -> install.Installer:
    shim = tmp_path / "shim"
    shim.write_bytes(b"\x7fELF fake")
    (tmp_path / "bin").mkdir()
    (tmp_path / "net.d").mkdir()
    return install.Installer(shim, tmp_path / "bin", tmp_path / "net.d", PLUGIN)


async def test_install_rewrite_and_uninstall(tmp_path: Path) -> None:
    inst = installer(tmp_path)
    conf = tmp_path / "net.d" / "10-calico.conflist"
    conf.write_text(json.dumps(PRIMARY))
    async with trio.open_nursery() as nursery:
        await nursery.start(inst.run)
        assert (tmp_path / "bin" / "veil-cni").read_bytes() == b"\x7fELF fake"
        assert json.loads(conf.read_text())["plugins"][-1] == PLUGIN
        # The primary CNI rewrites its file (an upgrade of it): Veil is chained again.
        conf.write_text(json.dumps(PRIMARY))
        with trio.fail_after(5):
            while json.loads(conf.read_text())["plugins"][-1] != PLUGIN:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    inst.uninstall()
    assert json.loads(conf.read_text()) == PRIMARY
    assert not (tmp_path / "bin" / "veil-cni").exists()
    assert sorted(p.name for p in (tmp_path / "net.d").iterdir()) == ["10-calico.conflist"]


def test_a_conf_file_is_converted_next_to_itself(tmp_path: Path) -> None:
    inst = installer(tmp_path)
    (tmp_path / "net.d" / "10-flannel.conf").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "cbr0", **PTP})
    )
    assert inst.ensure()
    assert sorted(p.name for p in (tmp_path / "net.d").iterdir()) == ["10-flannel.conflist"]
    assert not inst.ensure()


def test_no_primary_yet_means_nothing_written(tmp_path: Path) -> None:
    inst = installer(tmp_path)
    assert not inst.ensure()
    (tmp_path / "net.d" / "10-x.conflist").write_text("{ being written")
    assert not inst.ensure()  # unreadable: left alone, looked at again


def test_a_missing_shim_is_a_clear_error(tmp_path: Path) -> None:
    inst = installer(tmp_path)
    inst.shim.unlink()
    with pytest.raises(install.InstallError, match="missing"):
        inst.install_binary()


def test_the_not_ready_taint_is_removed_and_nothing_else():
    taints = [
        {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
        {"key": node.NOT_READY_TAINT, "value": "true", "effect": "NoSchedule"},
    ]
    assert node.without_taint(taints, node.NOT_READY_TAINT) == taints[:1]
    assert node.without_taint(taints[:1], node.NOT_READY_TAINT) is None
    assert node.without_taint(None, node.NOT_READY_TAINT) is None
    patch = node.taint_patch(taints, taints[:1])
    assert patch[0] == {"op": "test", "path": "/spec/taints", "value": taints}
