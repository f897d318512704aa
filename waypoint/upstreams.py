"""The waypoint's connections to backends: HBONE tunnels to pods' 15008 (pooled, the pod's
identity verified), HTTP/1.1 or HTTP/2 client connections over their streams kept idle for
reuse, and the circuit breaker of each addressed Service counting them."""

from __future__ import annotations

import socket
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from veil.core.ports import HBONE_PORT
from veil.core.spiffe import SpiffeId
from veil.core.state import Workload
from veil.core.traffic import PoolLimits, TrafficPolicy
from veil.runtime.hbone.io import HboneError, HboneIO, Stream
from veil.runtime.hbone.pool import HbonePool
from veil.runtime.identity.manager import CertificateManager
from veil.waypoint.http2 import H2Client
from veil.waypoint.messages import next_event
from veil.waypoint.resilience import CircuitBreaker

CONNECT_TIMEOUT = 5.0
MAX_IDLE_UPSTREAMS = 16


Key = tuple[str, str, int, bool]  # (Service the request addressed, pod IP, port, HTTP/2)


@dataclass
class Upstream:
    """An HTTP/1.1 (or HTTP/2) client connection to one pod, over one HBONE stream."""

    key: Key
    stream: Stream
    conn: h11.Connection | H2Client = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def reusable(self) -> bool:
        if isinstance(self.conn, H2Client):
            return self.conn.reusable()
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


class Upstreams:
    """Owns every upstream connection: opened through `pool` as `identity`, released to an
    idle list only when both sides finished a message cleanly, dropped (reset) otherwise."""

    def __init__(
        self,
        pool: HbonePool,
        certs: CertificateManager,
        identity: SpiffeId,
        trust_domain: str,
    ) -> None:
        self.pool, self.certs, self.identity = pool, certs, identity
        self.trust_domain = trust_domain
        self.idle: dict[Key, list[Upstream]] = defaultdict(list)
        self.breakers: dict[str, CircuitBreaker] = {}

    async def tunnel(self, w: Workload, port: int, client_ip: str, extra: list[Any]) -> Stream:
        """A CONNECT stream to a pod's 15008, expecting the pod's identity."""
        assert w.ip is not None
        ip = w.ip
        expected = w.identity(self.trust_domain)
        cred = await self.certs.get(self.identity, timeout=5)

        async def dial() -> HboneIO:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    try:
                        sock.connect((ip, HBONE_PORT))
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connect to {ip}:{HBONE_PORT} failed")
            except BaseException:
                sock.close()
                raise
            return await self.pool.tunnel(sock, cred.client_context, expected)

        headers = [
            ("forwarded", f'for="{client_ip}"' if client_ip else f'for="{ip}"'),
            ("baggage", f"k8s.namespace.name={self.identity.namespace},k8s.pod.name=waypoint"),
            *extra,
        ]
        return await self.pool.open_stream((ip, expected), dial, f"{ip}:{port}", headers)

    def has_idle(self, svc: str, w: Workload, port: int, http2: bool = False) -> bool:
        return bool(self.idle.get((svc, w.ip or "", port, http2)))

    async def acquire(  # noqa: PLR0917
        self, w: Workload, port: int, client_ip: str, trace: str, svc: str = "", http2: bool = False
    ) -> Upstream:
        """An idle connection to the pod, else a new one (its breaker counts it); `http2`:
        one that speaks HTTP/2 (prior knowledge) to the pod."""
        assert w.ip is not None
        key = (svc, w.ip, port, http2)
        while self.idle[key]:
            up = self.idle[key].pop()
            if up.stream.reset_code is None and not up.stream.eof:
                return up
            self.drop(up)
        stream = await self.tunnel(w, port, client_ip, [("traceparent", trace)])
        self.breaker(svc).connections += 1
        if http2:
            return Upstream(key, stream, H2Client(stream))
        return Upstream(key, stream)

    def release(self, up: Upstream) -> None:
        if up.reusable() and len(self.idle[up.key]) < MAX_IDLE_UPSTREAMS:
            up.conn.start_next_cycle()
            self.idle[up.key].append(up)
        else:
            self.drop(up)

    def drop(self, up: Upstream) -> None:
        up.stream.reset()
        up.stream.close()
        self.breaker(up.key[0]).connections -= 1

    async def discard(self, up: Upstream) -> None:
        """Read a response away (a retried or mirrored one), then release the connection."""
        try:
            while not isinstance(
                await next_event(up.conn, up.stream), h11.EndOfMessage | h11.ConnectionClosed
            ):
                pass
        except (h11.ProtocolError, HboneError):
            self.drop(up)
            return
        self.release(up)

    def breaker(self, svc: str, policy: TrafficPolicy | None = None) -> CircuitBreaker:
        """The circuit breaker of an addressed Service (like an Envoy cluster's), with the
        limits of its TrafficPolicy when one is given."""
        cb = self.breakers.get(svc)
        if cb is None:
            cb = self.breakers[svc] = CircuitBreaker(PoolLimits())
        if policy is not None:
            cb.limits = policy.pool or PoolLimits()
        return cb
