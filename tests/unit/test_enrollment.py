"""Enrollment when capture cannot work at all: the pod is never reported enrolled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from veil.agent.capture.base import CaptureTarget
from veil.agent.enrollment import EnrollError, Enrollment, cgroup_path
from veil.core.state import Workload


class RecordingCapture:
    mode = "ebpf"

    def __init__(self) -> None:
        self.installed: list[CaptureTarget] = []

    def start(self) -> None: ...

    def install(self, t: CaptureTarget) -> None:
        self.installed.append(t)

    def remove(self, t: CaptureTarget) -> None: ...

    def forget_others(self) -> None: ...

    def close(self, handed_over: bool = False) -> None: ...

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


# -- following labels, as a pure plan (issue 18.7) -----------------------------------------------


OPT_OUT = {"veil.dev/dataplane-mode": "none"}
MODE = "veil.dev/dataplane-mode"


def _cluster(*pods: dict[str, Any], mesh: bool = True) -> Any:
    from veil.core.state import build_state  # noqa: PLC0415

    labels = {"veil.dev/dataplane-mode": "ambient"} if mesh else {}
    ns = {"kind": "Namespace", "metadata": {"name": "mesh", "labels": labels}}
    return build_state([ns, *pods], 1)


def _pod(name: str, uid: str = "u1", node: str = "node1", **labels: str) -> dict[str, Any]:
    from veil.agent.enrollment import NETNS_ANNOTATION  # noqa: PLC0415

    return {
        "kind": "Pod",
        "metadata": {
            "namespace": "mesh",
            "name": name,
            "uid": uid,
            "labels": labels,
            "annotations": {NETNS_ANNOTATION: f"ns-{name}"},
        },
        "spec": {"nodeName": node},
        "status": {"podIP": "10.244.1.9", "phase": "Running"},
    }


@pytest.mark.parametrize(
    ("pods", "mesh", "enrolled", "release", "enroll"),
    [
        ([_pod("a")], True, {}, [], ["mesh/a"]),  # new and wanted
        ([_pod("a")], True, {"mesh/a": "u1"}, [], []),  # already enrolled
        ([_pod("a")], False, {"mesh/a": "u1"}, ["mesh/a"], []),  # namespace left the mesh
        (
            [_pod("a", **{"veil.dev/dataplane-mode": "none"})],
            True,
            {"mesh/a": "u1"},
            ["mesh/a"],
            [],
        ),
        ([], True, {"mesh/a": "u1"}, ["mesh/a"], []),  # gone
        ([_pod("a", uid="u2")], True, {"mesh/a": "u1"}, ["mesh/a"], ["mesh/a"]),  # replaced
        ([_pod("a", node="node2")], True, {}, [], []),  # another node's
        ([_pod("gone-netns")], True, {}, [], []),  # its netns is not there (yet)
    ],
)
def test_the_reconcile_plan(pods, mesh, enrolled, release, enroll):
    from veil.agent.enrollment import netns_path, plan_reconcile  # noqa: PLC0415

    def locate(w):
        path = netns_path(w)
        return path if path and "gone" not in path else None

    plan = plan_reconcile(_cluster(*pods, mesh=mesh), "node1", enrolled, locate)
    assert list(plan.release) == release
    assert [w.key for w, _ in plan.enroll] == enroll
    assert all(path.startswith("/run/netns/ns-") for _, path in plan.enroll)


async def test_a_cni_add_for_an_enrolled_pod_captures_its_new_network(tmp_path: Path) -> None:
    """An ADD for a pod already enrolled means a new sandbox (the runtime set the network up
    again, perhaps at the same netns path after a DEL the agent never heard of): the old
    capture and listeners are let go and the new network is captured, never left as is."""
    from types import SimpleNamespace  # noqa: PLC0415

    from veil.agent.enrollment import Enrolled  # noqa: PLC0415
    from veil.runtime.store import StateStore  # noqa: PLC0415

    ctx: Any = SimpleNamespace(store=StateStore(_cluster(_pod("client"))), node="node1")
    e = Enrollment(ctx, tmp_path, RecordingCapture())
    calls: list[str] = []

    async def enroll(
        w: Workload, netns: str, ip: str, cgroup: str | None = None, listeners: Any = ()
    ) -> None:
        calls.append(f"enroll {w.key} {netns} {ip}")
        e.pods[w.key] = Enrolled(w.namespace, w.name, w.uid, netns, ip)

    async def release(key: str) -> None:
        calls.append(f"release {key}")
        e.pods.pop(key, None)

    e._enroll = enroll  # type: ignore[method-assign]
    e._release = release  # type: ignore[method-assign]
    assert await e.cni_add("mesh", "client", "/run/netns/ns-client", "10.244.1.9")
    assert await e.cni_add("mesh", "client", "/run/netns/ns-client", "10.244.1.12")
    assert calls == [
        "enroll mesh/client /run/netns/ns-client 10.244.1.9",
        "release mesh/client",
        "enroll mesh/client /run/netns/ns-client 10.244.1.12",
    ]


def test_a_registry_that_cannot_be_written_is_said_and_written_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full or read-only disk under the registry must not stop the agent (it would have
    ended the enrollment task, and so the agent, on the next pod): the error is logged once,
    counted and kept for readiness; the next write that works clears it."""
    from veil.agent.enrollment import Enrolled  # noqa: PLC0415

    e = Enrollment(object(), tmp_path, RecordingCapture())  # type: ignore[arg-type]
    e.pods["mesh/client"] = Enrolled("mesh", "client", "u1", "/run/netns/x", "10.244.1.10")
    blocker = tmp_path / ".pods.json.tmp"
    blocker.mkdir()  # the temporary file cannot be created: as on a full or read-only disk
    e._save()
    e._save()
    assert e.registry_failures == 2 and "pods.json: Is a directory" in (e.registry_error or "")
    assert not (tmp_path / "pods.json").exists()
    assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1
    blocker.rmdir()
    e._save()
    assert e.registry_error is None and "mesh/client" in (tmp_path / "pods.json").read_text()


async def test_a_cni_add_waits_for_one_enrollment_not_a_whole_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A namespace labelled into the mesh enrolls its pods one lock at a time: a CNI ADD of
    another pod arriving meanwhile is served after the enrollment in progress, not after
    all of them; and a pod the newest state no longer wants is skipped when its turn comes."""
    from types import SimpleNamespace  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from veil.agent import enrollment  # noqa: PLC0415
    from veil.agent.enrollment import Enrolled  # noqa: PLC0415
    from veil.core.state import build_state  # noqa: PLC0415
    from veil.runtime.store import StateStore  # noqa: PLC0415

    for i in range(20):
        (tmp_path / f"ns-p{i}").touch()
    (tmp_path / "noproc").mkdir()

    def located(w: Workload) -> str | None:  # "late" comes by CNI ADD only
        return None if w.name == "late" else str(tmp_path / f"ns-{w.name}")

    monkeypatch.setattr(enrollment, "netns_path", located)
    pods = [_pod(f"p{i}", uid=f"u{i}") for i in range(20)]
    store = StateStore(_cluster(*pods, _pod("late", uid="ul")))
    ctx: Any = SimpleNamespace(store=store, node="node1")
    e = Enrollment(ctx, tmp_path / "data", RecordingCapture(), host_proc=tmp_path / "noproc")
    calls: list[str] = []

    async def enroll(
        w: Workload, netns: str, ip: str, cgroup: str | None = None, listeners: Any = ()
    ) -> None:
        calls.append(w.name)
        await trio.sleep(0.01)  # capture being installed
        e.pods[w.key] = Enrolled(w.namespace, w.name, w.uid, netns, ip)

    e._enroll = enroll  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(e.reconcile, store.current)
        await trio.sleep(0.015)  # the reconcile is in its second enrollment
        ns = {"kind": "Namespace", "metadata": {"name": "mesh", "labels": {MODE: "ambient"}}}
        store.update(build_state([ns, *pods[:19], _pod("late", uid="ul")], 2))  # p19 deleted
        assert await e.cni_add("mesh", "late", "/run/netns/late", "10.244.1.30")
        assert "p5" not in calls  # served while the namespace is still being enrolled
    assert calls.index("late") <= 3, calls
    assert "p19" not in calls and len(calls) == 20  # p0..p18 and late


async def test_pod_locks_serialize_one_pod_run_others_side_by_side_and_every_waits():
    import trio  # noqa: PLC0415

    from veil.agent.enrollment import PodLocks  # noqa: PLC0415

    locks, log = PodLocks(), []

    async def change(key: str, name: str) -> None:
        async with locks.pod(key):
            log.append(f"{name} in")
            await trio.sleep(0.01)
            log.append(f"{name} out")

    async def every() -> None:
        async with locks.every():
            log.append("every in")
            await trio.sleep(0.01)
            log.append("every out")

    async with trio.open_nursery() as n:
        n.start_soon(change, "a", "a1")
        n.start_soon(change, "a", "a2")
        n.start_soon(change, "b", "b1")
        await trio.sleep(0.001)
        n.start_soon(every)
        await trio.sleep(0.001)
        n.start_soon(change, "c", "c1")  # after every(): held off until it is done
    assert sorted(log[:2]) in (["a1 in", "b1 in"], ["a2 in", "b1 in"]), log  # side by side
    a = [x for x in log if x.startswith("a")]
    assert a[0][:2] == a[1][:2] and a[2][:2] == a[3][:2], log  # one pod: one at a time
    assert log.index("every in") > max(log.index(f"{x} out") for x in ("a1", "a2", "b1"))
    assert log.index("c1 in") > log.index("every out")


async def test_a_namespace_is_enrolled_side_by_side_as_the_capture_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """iptables capture changes several pods at once (its time is the kernel's commit); a
    replaced pod is released before it is enrolled again."""
    from types import SimpleNamespace  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from veil.agent import enrollment  # noqa: PLC0415
    from veil.agent.enrollment import Enrolled  # noqa: PLC0415
    from veil.runtime.store import StateStore  # noqa: PLC0415

    for i in range(12):
        (tmp_path / f"ns-p{i}").touch()
    monkeypatch.setattr(enrollment, "netns_path", lambda w: str(tmp_path / f"ns-{w.name}"))
    store = StateStore(_cluster(*[_pod(f"p{i}", uid=f"u{i}") for i in range(12)]))
    capture = RecordingCapture()
    capture.concurrency = 4  # type: ignore[attr-defined]
    ctx: Any = SimpleNamespace(store=store, node="node1")
    e = Enrollment(ctx, tmp_path / "data", capture)
    e.pods["mesh/p0"] = Enrolled("mesh", "p0", "old-uid", str(tmp_path / "ns-p0"), "10.244.1.9")
    busy, most, log = 0, 0, []

    async def enroll(
        w: Workload, netns: str, ip: str, cgroup: str | None = None, listeners: Any = ()
    ) -> None:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        log.append(f"enroll {w.name}")
        await trio.sleep(0.01)
        e.pods[w.key] = Enrolled(w.namespace, w.name, w.uid, netns, ip)
        busy -= 1

    async def release(key: str) -> None:
        log.append(f"release {key}")
        e.pods.pop(key, None)

    e._enroll = enroll  # type: ignore[method-assign]
    e._release = release  # type: ignore[method-assign]
    await e.reconcile(store.current)
    assert most == 4
    assert log[0] == "release mesh/p0" and len(e.pods) == 12
    assert e.pods["mesh/p0"].uid == "u0"


@pytest.mark.parametrize("registry_broken", [False, True])
async def test_a_pod_that_could_not_be_enrolled_is_tried_again_without_a_state_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_broken: bool
) -> None:
    """A capture tool that fails (seen: `ip6tables-restore` under a stepped clock) must not
    leave a wanted pod unenrolled until the cluster state happens to change: it is tried
    again, backing off, until it is enrolled (also while the registry cannot be written)."""
    from types import SimpleNamespace  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from veil.agent import enrollment  # noqa: PLC0415
    from veil.agent.enrollment import Enrolled  # noqa: PLC0415
    from veil.runtime.store import StateStore  # noqa: PLC0415

    (tmp_path / "ns-p").touch()
    monkeypatch.setattr(enrollment, "netns_path", lambda w: str(tmp_path / f"ns-{w.name}"))
    store = StateStore(_cluster(_pod("p")))
    ctx: Any = SimpleNamespace(store=store, node="node1")
    e = Enrollment(ctx, tmp_path / "data", RecordingCapture())
    if registry_broken:
        (tmp_path / "data" / ".pods.json.tmp").mkdir(parents=True)
    tries: list[float] = []

    async def enroll(
        w: Workload, netns: str, ip: str, cgroup: str | None = None, listeners: Any = ()
    ) -> None:
        tries.append(trio.current_time())
        if len(tries) < 3:
            raise EnrollError("ip6tables-restore --noflush: [Errno 22] Invalid argument")
        e.pods[w.key] = Enrolled(w.namespace, w.name, w.uid, netns, ip)

    e._enroll = enroll  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(e.run)
        with trio.fail_after(10):
            while "mesh/p" not in e.pods:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert len(tries) == 3 and e.enroll_failed == set()
    assert (e.registry_error is not None) == registry_broken
    assert tries[2] - tries[1] >= 2 * (tries[1] - tries[0]) * 0.9  # backing off
