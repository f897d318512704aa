"""The waypoint's driver (`waypoint/exchange.py`) executing plans against a scripted backend:
no lab, no tunnels, trio's autojump clock for timeouts (issue 18, item 4's scripted
conversations; issue 22's `timeouts.request` over the whole response)."""

from __future__ import annotations

import random
from typing import Any

import h11
import pytest
import trio
from prometheus_client import CollectorRegistry

from tests.support.hbone import FRONTEND
from tests.support.waypoint import Pipe
from veil.core.state import MeshState, Workload, build_state
from veil.core.traffic import PoolLimits, TrafficPolicy
from veil.waypoint import pipeline
from veil.waypoint.exchange import Forwarder, Request
from veil.waypoint.messages import HttpError
from veil.waypoint.pipeline import Caller, Plan
from veil.waypoint.resilience import CircuitBreaker, Limits
from veil.waypoint.telemetry import RequestMetrics, RequestRecord
from veil.waypoint.upstreams import Upstream

ME = pipeline.ThisWaypoint("shop", "waypoint", "cluster.local")


class Backend:
    """A stand-in HBONE stream to a pod: answers with `script`, then stays silent."""

    def __init__(self, script: list[bytes]) -> None:
        self.script = list(script)
        self.sent = bytearray()
        self.reset_code: int | None = None
        self.eof = False

    async def receive(self) -> bytes:
        if self.script:
            return self.script.pop(0)
        await trio.sleep_forever()
        return b""

    async def send(self, data: Any) -> None:
        self.sent += bytes(data)

    async def send_eof(self) -> None:
        pass

    def reset(self, code: Any = None) -> None:
        self.reset_code = 8

    def close(self) -> None:
        pass


class ScriptedUpstreams:
    """What the Forwarder asks of `Upstreams`, with backends from a script."""

    trust_domain = "cluster.local"

    def __init__(self, *backends: Backend) -> None:
        self.backends = list(backends)
        self.dropped: list[Backend] = []
        self.released: list[Backend] = []
        self.breakers: dict[str, CircuitBreaker] = {}

    async def acquire(
        self, w: Workload, port: int, client_ip: str, trace: str, svc: str = "", http2: bool = False
    ):
        return Upstream((svc, w.ip or "", port, http2), self.backends.pop(0))  # type: ignore[arg-type]

    def has_idle(self, svc: str, w: Workload, port: int, http2: bool = False) -> bool:
        return False

    def breaker(self, svc: str, policy: TrafficPolicy | None = None) -> CircuitBreaker:
        return self.breakers.setdefault(svc, CircuitBreaker(PoolLimits()))

    def release(self, up: Upstream) -> None:
        self.released.append(up.stream)  # type: ignore[arg-type]

    def drop(self, up: Upstream) -> None:
        up.stream.reset()
        self.dropped.append(up.stream)  # type: ignore[arg-type]

    async def discard(self, up: Upstream) -> None:
        self.drop(up)


def cluster(timeout: str | None) -> MeshState:
    rule: dict[str, Any] = {"backendRefs": [{"name": "catalog", "port": 80}]}
    if timeout:
        rule["timeouts"] = {"request": timeout}
    return build_state(
        [
            {
                "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"veil.dev/use-waypoint": "waypoint"}},
            },
            {
                "kind": "Gateway",
                "metadata": {"namespace": "shop", "name": "waypoint"},
                "spec": {"gatewayClassName": "veil-waypoint"},
            },
            {
                "kind": "Service",
                "metadata": {"namespace": "shop", "name": "catalog"},
                "spec": {
                    "clusterIP": "10.96.0.5",
                    "ports": [{"port": 80}],
                    "selector": {"app": "catalog"},
                },
            },
            {
                "kind": "Pod",
                "metadata": {
                    "namespace": "shop",
                    "name": "catalog-1",
                    "labels": {"app": "catalog"},
                },
                "spec": {"nodeName": "node1"},
                "status": {
                    "podIP": "10.244.1.7",
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"namespace": "shop", "name": "catalog"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "catalog"}],
                    "rules": [rule],
                },
            },
        ],
        1,
    )


async def exchange(state: MeshState, upstreams: ScriptedUpstreams) -> tuple[Pipe, RequestRecord]:
    dest = pipeline.destination(state, ME, ("10.96.0.5", 80))
    assert not isinstance(dest, str), dest
    down = h11.Connection(h11.SERVER)
    down.receive_data(b"GET /items HTTP/1.1\r\nHost: catalog\r\n\r\n")
    req = down.next_event()
    assert isinstance(req, h11.Request)
    plan = pipeline.plan(state, ME, dest, Caller(FRONTEND, "10.244.1.5"), req, rng=random.Random(1))
    assert isinstance(plan, Plan), plan
    client = Pipe()
    rec = RequestRecord(method="GET", path="/items", authority=dest.authority)
    failed: HttpError | None = None
    async with trio.open_nursery() as nursery:
        fwd = Forwarder(
            lambda: state,
            upstreams,  # type: ignore[arg-type]
            Limits(),
            RequestMetrics(CollectorRegistry()),
            random.Random(1),
            nursery,
        )
        try:
            await fwd.forward(plan, Request(down, client, dest, rec, "10.244.1.5"))  # type: ignore[arg-type]
        except HttpError as e:  # raised here, not as a group out of the nursery
            failed = e
        nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return client, rec


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


async def test_a_response_is_relayed_and_its_connection_kept(autojump_clock):
    backend = Backend([HEAD, b"0123456789"])
    upstreams = ScriptedUpstreams(backend)
    client, rec = await exchange(cluster(None), upstreams)
    assert bytes(client.out).startswith(b"HTTP/1.1 200 ") and bytes(client.out).endswith(
        b"0123456789"
    )
    assert backend.sent.startswith(b"GET /items HTTP/1.1\r\n")
    assert upstreams.released == [backend] and rec.response_code == 200


async def test_timeouts_request_covers_the_whole_response(autojump_clock):
    """Issue 22: the request timeout stopped at the response head; a backend that sent its
    head and then stalled held the request forever."""
    backend = Backend([HEAD, b"01234"])  # then nothing more
    upstreams = ScriptedUpstreams(backend)
    with pytest.raises(HttpError) as err:
        with trio.fail_after(60):
            await exchange(cluster("2s"), upstreams)
    assert (err.value.status, err.value.flags) == (504, "UT")
    assert "the response not complete within 2s" in str(err.value)
    assert upstreams.dropped == [backend] and backend.reset_code is not None


async def test_without_a_response_head_the_timeout_answers_504(autojump_clock):
    upstreams = ScriptedUpstreams(Backend([]))
    with pytest.raises(HttpError, match="no response within 2s"):
        await exchange(cluster("2s"), upstreams)
