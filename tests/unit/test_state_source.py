"""The manifest source: which files make the state, and that a change is published."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from veil.runtime.sources.manifests import ManifestSource, signature
from veil.runtime.store import StateStore


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


# -- the state updated by events (issue 18.1) ----------------------------------------------------


def pod(name: str, ip: str, **labels: str) -> dict[str, object]:
    return {
        "kind": "Pod",
        "metadata": {"namespace": "a", "name": name, "labels": labels},
        "spec": {"nodeName": "node1"},
        "status": {"podIP": ip, "phase": "Running"},
    }


def test_the_builder_converts_one_object_per_event() -> None:
    from veil.core.state import StateBuilder  # noqa: PLC0415

    b = StateBuilder()
    b.apply(pod("p2", "10.0.0.2"))
    b.apply(pod("p1", "10.0.0.1"))
    s1 = b.snapshot(1)
    assert [w.name for w in s1.workloads] == ["p1", "p2"]  # sorted as before
    b.apply(pod("p1", "10.0.0.9", app="x"))  # modified
    b.delete(("Pod", "a", "p2"))
    s2 = b.snapshot(2)
    assert [(w.name, w.ip, dict(w.labels)) for w in s2.workloads] == [
        ("p1", "10.0.0.9", {"app": "x"})
    ]
    assert s2.workload("a", "p1") is s2.workloads[0] and s1.workload("a", "p2") is not None
    broken = pod("p3", "not-an-ip")
    b.apply(broken)
    assert [e.split(":")[0] for e in b.snapshot(3).errors] == ["Pod a/p3"]
    b.apply(pod("p3", "10.0.0.3"))  # the good version replaces the error
    s4 = b.snapshot(4)
    assert s4.errors == () and s4.workload("a", "p3") is not None


@pytest.mark.parametrize("watch", [True, False], ids=["inotify", "polling"])
async def test_only_changed_files_are_read_again(tmp_path: Path, monkeypatch, watch) -> None:
    from veil.runtime.sources import manifests  # noqa: PLC0415

    for i in range(5):
        (tmp_path / f"ns{i}.yaml").write_text(namespace(f"n{i}"))
    read: list[list[str]] = []
    real = manifests.parse_files

    def counting(paths):
        paths = list(paths)
        read.append([Path(p).name for p in paths])
        return real(paths)

    monkeypatch.setattr(manifests, "parse_files", counting)
    store = StateStore()
    async with trio.open_nursery() as nursery:
        source = ManifestSource(tmp_path, interval=0.01, watch=watch)
        await nursery.start(source.run, store)
        assert source.watching is watch
        assert len(read[0]) == 5 and set(store.current.namespaces) == {f"n{i}" for i in range(5)}

        async def change(fn) -> None:
            version = store.current.version
            fn()
            with trio.fail_after(2):
                await store.wait_newer(version)

        await change(lambda: (tmp_path / "ns2.yaml").write_text(namespace("n2", mode="none")))
        assert read[-1] == ["ns2.yaml"]
        assert store.current.namespaces["n2"].labels["veil.dev/dataplane-mode"] == "none"
        await change((tmp_path / "ns3.yaml").unlink)  # a removed file: no read at all
        assert read[-1] == [] and "n3" not in store.current.namespaces
        await change(lambda: (tmp_path / "ns4.yaml").write_text("kind: [unclosed"))
        assert "n4" in store.current.namespaces  # its last good objects stay in force ...
        assert any("ns4.yaml: invalid YAML" in e for e in store.current.errors)  # ... and said
        assert "ns4.yaml: invalid YAML" in (source.not_synced() or "")  # (readiness)
        await change(lambda: (tmp_path / "ns4.yaml").write_text(namespace("n4b")))
        assert "n4b" in store.current.namespaces and "n4" not in store.current.namespaces
        assert store.current.errors == () and source.not_synced() is None
        nursery.cancel_scope.cancel()


def test_policies_are_parsed_once_by_the_writer_and_keep_their_last_valid_version() -> None:
    from veil.core.state import StateBuilder  # noqa: PLC0415

    def policy(action: str) -> dict[str, object]:
        return {
            "apiVersion": "security.veil.dev/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "a", "name": "p"},
            "spec": {"action": action, "rules": [{}]},
        }

    b = StateBuilder()
    b.apply(policy("DENY"))
    s1 = b.snapshot(1)
    assert s1.policies.policies["a/p"].action == "DENY"
    b.apply(pod("x", "10.0.0.1"))
    assert b.snapshot(2).policies is s1.policies  # not parsed again for a pod's change
    b.apply(policy("MAYBE"))  # a bad edit: the last valid version stays in force
    s3 = b.snapshot(3)
    assert s3.policies.policies["a/p"].action == "DENY" and "a/p" in s3.policies.errors
    b.delete(("AuthorizationPolicy", "a", "p"))
    assert b.snapshot(4).policies.policies == {}


async def test_watched_directories_come_and_go(tmp_path: Path) -> None:
    """inotify: a directory made after the start (the lab's first pod of a namespace) is
    watched, files written into it before its watch existed included; a directory removed
    takes its objects with it; and nothing is walked while nothing changes."""
    from veil.runtime.sources import manifests  # noqa: PLC0415

    (tmp_path / "namespaces").mkdir()
    (tmp_path / "namespaces" / "a.yaml").write_text(namespace("a"))
    store = StateStore()
    source = ManifestSource(tmp_path, resync=3600)
    walks: list[int] = []
    real = manifests.signature

    def counting(root: Path) -> manifests.Signature:
        walks.append(1)
        return real(root)

    async with trio.open_nursery() as nursery:
        import unittest.mock  # noqa: PLC0415

        with unittest.mock.patch.object(manifests, "signature", counting):
            await nursery.start(source.run, store)
            assert source.watching and len(walks) == 1

            async def change(fn) -> None:
                version = store.current.version
                fn()
                with trio.fail_after(2):
                    await store.wait_newer(version)

            def new_dir() -> None:
                d = tmp_path / "namespaces" / "more" / "deeper"
                d.mkdir(parents=True)
                (d / "b.yaml").write_text(namespace("b"))
                (d / "c.yaml").write_text(namespace("c"))

            await change(new_dir)
            await trio.sleep(0.1)  # the files' own events (or none): the same state
            assert set(store.current.namespaces) == {"a", "b", "c"}
            await change(
                lambda: (tmp_path / "namespaces" / "more" / "deeper" / "d.yaml").write_text(
                    namespace("d")
                )
            )
            assert set(store.current.namespaces) == {"a", "b", "c", "d"}

            def remove_dir() -> None:
                import shutil  # noqa: PLC0415

                shutil.rmtree(tmp_path / "namespaces" / "more")

            await change(remove_dir)
            assert set(store.current.namespaces) == {"a"}
            assert len(walks) == 1  # events only: no walk of the directory after the first
            nursery.cancel_scope.cancel()


async def test_the_resync_walk_mends_what_no_event_said(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(namespace("a"))
    store = StateStore()
    source = ManifestSource(tmp_path, resync=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, store)
        source._look = lambda paths: ({}, [], [])  # type: ignore[method-assign]  # events lost
        (tmp_path / "b.yaml").write_text(namespace("b"))
        with trio.fail_after(2):
            await store.wait_newer(store.current.version)  # the next walk's
        assert set(store.current.namespaces) == {"a", "b"}
        nursery.cancel_scope.cancel()
