"""Where the lab looks for the upstream control plane, and what `veil check` says of it."""

from __future__ import annotations

import pytest

from veil.lab import upstream


def test_the_pins_come_from_upstream_go_mod():
    assert (upstream.pinned() or "").startswith("v1.")
    assert (upstream.pinned("go.etcd.io/etcd/server/v3") or "").startswith("v3.")
    assert (upstream.pinned("helm.sh/helm/v4") or "").startswith("v4.")
    # every staging module is pinned to the matching v0 release
    minor = (upstream.pinned() or "").removeprefix("v1.")
    text = upstream.GO_MOD.read_text()
    assert f"k8s.io/api => k8s.io/api v0.{minor}" in text
    assert f"k8s.io/apimachinery => k8s.io/apimachinery v0.{minor}" in text


def test_check_says_what_is_missing_and_how_to_build_it(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    c = upstream.check()
    assert not c.ok
    assert str(tmp_path / "kubernetes") in c.detail and "kube-apiserver" in c.detail
    assert "make upstream" in c.fix
    d = upstream.bin_dir()
    d.mkdir(parents=True)
    for b in upstream.BINARIES:
        (d / b).write_text("#!/bin/sh\n")
        (d / b).chmod(0o755)
    assert not upstream.check().ok and "Gateway API" in upstream.check().detail
    upstream.gateway_crds().mkdir(parents=True)
    (upstream.gateway_crds() / ".done").touch()
    assert upstream.check().ok


def test_the_gateway_api_pin_is_the_build_scripts():
    script = (upstream.ROOT / "scripts" / "build-upstream.sh").read_text()
    assert f"\nGATEWAY_API={upstream.GATEWAY_API}\n" in script
