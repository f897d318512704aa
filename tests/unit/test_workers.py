"""An agent's worker processes: the wire between them and the control process, copied
certificates, merged metrics, how many workers `auto` means, and the pool keeping real worker
processes running and informed (pods need network namespaces: tests/integration)."""

import os
import pickle
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.mesh import CATALOG, FRONTEND, TD, handshake, run_manager
from tests.support.waiting import until
from veil.agent.workers import WorkerPool
from veil.agent.workerwire import (
    MAX_FRAME,
    Ask,
    Decoder,
    Serve,
    SetState,
    Stop,
    WireError,
    encode,
)
from veil.cli import parse_workers
from veil.core.spiffe import SpiffeId
from veil.core.state import MeshState, Workload
from veil.runtime.config import default_workers
from veil.runtime.identity.copies import CertificateCopies, CredentialCopy
from veil.runtime.identity.manager import NoCertificate
from veil.runtime.store import StateStore
from veil.runtime.telemetry.families import Merged

IP = "10.244.1.12"
POD = Workload(namespace="shop", name="cart-0", node="node1", service_account="cart", ip=IP)


# -- the wire ---------------------------------------------------------------------------------


def test_frames_split_anywhere_come_out_whole_with_their_sockets():
    a, b = os.pipe()
    frames = encode(SetState(MeshState(version=7))) + encode(Serve(1, POD, "/ns", IP, 2))
    serve_at = len(encode(SetState(MeshState(version=7))))
    frames += encode(Stop(POD.key))
    d = Decoder()
    got: list[Any] = []
    for i in range(len(frames)):  # one byte a read; the sockets ride with the Serve's first
        d.feed(frames[i : i + 1], [a, b] if i == serve_at else [])
        got += list(d.messages())
    assert [type(m).__name__ for m in got] == ["SetState", "Serve", "Stop"]
    assert got[0].state.version == 7
    assert got[1].workload == POD and got[1].fds == [a, b]
    assert got[2] == Stop(POD.key)
    assert d.leftover_fds() == []
    os.close(a)
    os.close(b)


def test_a_serve_without_its_sockets_or_a_huge_frame_breaks_the_channel():
    d = Decoder()
    d.feed(encode(Serve(1, POD, "/ns", IP, 3)), [5])
    with pytest.raises(WireError, match="without its sockets"):
        list(d.messages())
    d = Decoder()
    d.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(WireError, match="a frame of"):
        list(d.messages())
    d = Decoder()
    d.feed(b"\x00\x00\x00\x03abc")
    with pytest.raises(WireError, match="unreadable"):
        list(d.messages())


# -- certificates -----------------------------------------------------------------------------


async def test_a_copied_credential_does_the_same_mutual_tls(ca):
    async with trio.open_nursery() as n:
        node1 = await run_manager(n, ca.fetcher("node1"))
        node2 = await run_manager(n, ca.fetcher("node2"))
        client = await node1.get(FRONTEND)
        server = await node2.get(CATALOG)
        copied = pickle.loads(pickle.dumps(CredentialCopy.of(client))).credential()
        assert copied.leaf == client.leaf and copied.fetched_at == client.fetched_at
        assert await handshake(server, copied, {CATALOG}) == (CATALOG, FRONTEND)
        n.cancel_scope.cancel()


async def test_copies_ask_once_for_a_missing_certificate_and_wait_for_it(ca):
    async with trio.open_nursery() as n:
        node1 = await run_manager(n, ca.fetcher("node1"))
        cred = await node1.get(FRONTEND)
        wanted: list[SpiffeId] = []
        copies = CertificateCopies(want=wanted.append)
        got = []

        async def get():
            got.append(await copies.get(FRONTEND, timeout=5))

        n.start_soon(get)
        n.start_soon(get)
        await trio.sleep(0.05)
        assert wanted == [FRONTEND] and got == []
        copies.update([CredentialCopy.of(cred)])
        await until(lambda: len(got) == 2)
        assert got[0].leaf == cred.leaf
        copies.update([], gone=[FRONTEND])
        assert copies.current(FRONTEND) is None
        with pytest.raises(NoCertificate, match="from the agent"):
            await copies.get(CATALOG, timeout=0.05)
        expired = CertificateCopies(clock=lambda: cred.not_after + 1)
        expired.update([CredentialCopy.of(cred)])
        assert expired.current(FRONTEND) is None  # never served past its expiry
        n.cancel_scope.cancel()


# -- metrics ----------------------------------------------------------------------------------


def test_the_workers_metrics_add_up_to_the_nodes():
    def registry(opened, active):
        r = CollectorRegistry()
        c = Counter("conns_opened", "Opened", ["policy"], registry=r)
        c.labels("mutual_tls").inc(opened)
        Gauge("conns_active", "Active", registry=r).set(active)
        return r

    own, w1, w2 = registry(0, 0), registry(3, 1), registry(4, 2)
    Counter("only_here", "Only in the control process", registry=own).inc()
    text = generate_latest(Merged(own, lambda: [*w1.collect(), *w2.collect()])).decode()
    samples = {
        (s.name, tuple(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("conns_opened_total", (("policy", "mutual_tls"),))] == 7
    assert samples[("conns_active", ())] == 3
    assert samples[("only_here_total", ())] == 1
    assert text.count("# TYPE conns_opened_total counter") == 1  # one family, not three
    created = [v for (n, _), v in samples.items() if n == "conns_opened_created"]
    assert len(created) == 1 and created[0] == min(
        s.value
        for r in (own, w1, w2)
        for f in r.collect()
        for s in f.samples
        if s.name == "conns_opened_created"
    )


# -- how many -------------------------------------------------------------------------------


def test_auto_is_one_worker_per_usable_core_at_most_the_cap(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert default_workers(8, cpu_max) == min(8, cores)
    assert default_workers(1, cpu_max) == 1
    cpu_max.write_text("50000 100000\n")  # half a core: one worker
    assert default_workers(8, cpu_max) == 1
    cpu_max.write_text("150000 100000\n")  # 1.5 cores: two, if there are two
    assert default_workers(8, cpu_max) == min(2, cores)
    assert default_workers(8, tmp_path / "absent") == min(8, cores)
    assert parse_workers("3", 8) == 3
    assert parse_workers("auto", 1) == 1
    with pytest.raises(ValueError, match="a number or auto"):
        parse_workers("many", 8)
    with pytest.raises(ValueError, match="--max-workers 0"):
        parse_workers("auto", 0)


def test_the_agent_refuses_a_worker_count_out_of_range(tmp_path):
    from veil.runtime.config import AgentConfig  # noqa: PLC0415

    base = {
        "node": "node1",
        "state_dir": tmp_path,
        "ca_address": ("127.0.0.1", 15012),
        "ca_server_name": "ca",
        "ca_root": tmp_path / "root.pem",
        "token_file": tmp_path / "token",
    }
    assert AgentConfig(**base, workers=4).workers == 4
    for bad in (0, 65):
        with pytest.raises(ValueError, match="--workers"):
            AgentConfig(**base, workers=bad)


# -- the pool, with real worker processes ---------------------------------------------------


async def test_the_pool_keeps_its_workers_running_and_informed(ca):
    async with trio.open_nursery() as n:
        certs = await run_manager(n, ca.fetcher("node2"))
        certs.set_identities([FRONTEND])
        await certs.get(FRONTEND)
        store = StateStore(MeshState(version=3))
        pool = WorkerPool(2, "node2", TD, store, certs)
        await n.start(pool.run)

        async def seen() -> list[dict[str, Any]]:
            await pool.refresh()
            return pool.describe()

        # Each worker has the state and the certificates the control process holds.
        workers = await seen()
        assert [(w["index"], w["snapshot"], w["certificates"]) for w in workers] == [
            (0, 3, 1),
            (1, 3, 1),
        ]
        # A new snapshot and a new identity reach every worker.
        store.update(MeshState(version=4))
        certs.set_identities([FRONTEND, CATALOG])
        await until(lambda: len(certs.credentials()) == 2, timeout=10)
        for _ in range(100):
            workers = await seen()
            if all(w["snapshot"] == 4 and w["certificates"] == 2 for w in workers):
                break
            await trio.sleep(0.05)
        assert all(w["snapshot"] == 4 and w["certificates"] == 2 for w in workers), workers
        # A worker that dies is started again, and told everything anew.
        old = workers[0]["pid"]
        os.kill(old, signal.SIGKILL)
        for _ in range(200):
            workers = await seen()
            if len(workers) == 2 and workers[0]["pid"] != old and workers[0]["snapshot"] == 4:
                break
            await trio.sleep(0.05)
        assert pool.restarts == 1
        assert workers[0]["pid"] != old and workers[0]["snapshot"] == 4, workers
        assert workers[0]["certificates"] == 2
        # The workers' metrics are the node's: counters of both, one family each.
        names = {f.name for f in pool.metrics()}
        assert "veil_admission_refused" in names
        # Polling the connection counts (the drain) leaves the metrics out of the answers,
        # and the last ones asked for stay.
        await pool.refresh(metrics=False)
        assert all(w.stats is not None and w.stats.metrics is None for w in pool.workers.values())
        assert {f.name for f in pool.metrics()} == names
        n.cancel_scope.cancel()
    # Stopped with the pool: no worker is left behind.
    for proc in [Path(f"/proc/{w['pid']}") for w in workers]:
        await until(lambda: not proc.exists(), timeout=5)  # noqa: B023 - awaited here


def test_a_worker_exits_when_its_agent_is_gone():
    """The channel closing (the agent exited or was killed) ends the worker."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil.agent.worker", "--fd", str(theirs.fileno()), "--index", "0",
         "--node", "node1", "--trust-domain", TD],
        pass_fds=(theirs.fileno(),),
    )  # fmt: skip
    theirs.close()
    try:
        ours.sendall(encode(Ask(1)))
        assert len(ours.recv(4)) == 4  # its answer: it is up
        os.kill(proc.pid, signal.SIGTERM)  # ignored: signals are the agent's to act on
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
        ours.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
