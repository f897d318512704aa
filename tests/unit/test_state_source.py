"""The manifest source: which files make the state, and that a change is published."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from agent.state.sources.manifests import ManifestSource, signature
from agent.state.store import StateStore


def namespace(name: str, mode: str = "ambient") -> str:
    return (
        "apiVersion: v1\nkind: Namespace\n"
        f"metadata:\n  name: {name}\n  labels:\n    veil.dev/dataplane-mode: {mode}\n"
    )


def test_signature_walks_manifests_only(tmp_path: Path) -> None:
    (tmp_path / "namespaces" / "deep").mkdir(parents=True)
    (tmp_path / ".staging").mkdir()
    (tmp_path / "namespaces" / "a.yaml").write_text(namespace("a"))
    (tmp_path / "namespaces" / "deep" / "b.yaml").write_text(namespace("b"))
    (tmp_path / "namespaces" / ".c.yaml").write_text(namespace("c"))  # a writer's temp file
    (tmp_path / ".staging" / "d.yaml").write_text(namespace("d"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    got = [Path(p).relative_to(tmp_path).as_posix() for p, _, _ in signature(tmp_path)]
    assert got == ["namespaces/a.yaml", "namespaces/deep/b.yaml"]
    assert signature(tmp_path / "missing") == ()


def test_signature_changes_with_a_file(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(namespace("a"))
    before = signature(tmp_path)
    f.write_text(namespace("a", mode="none"))
    os.utime(f, ns=(before[0][1] + 1, before[0][1] + 1))  # even within one mtime tick
    assert signature(tmp_path) != before


async def test_a_change_is_published(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(namespace("a"))
    store = StateStore()
    async with trio.open_nursery() as nursery:
        await nursery.start(ManifestSource(tmp_path, interval=0.01).run, store)
        first = store.current
        assert set(first.namespaces) == {"a"}
        (tmp_path / "b.yaml").write_text(namespace("b"))
        with trio.fail_after(2):
            newer = await store.wait_newer(first.version)
        assert set(newer.namespaces) == {"a", "b"}
        nursery.cancel_scope.cancel()
