"""The waypoint's request handling without sockets: a stand-in HBONE stream, a waypoint
with a given cluster state, and a feeder that sends a client's bytes in parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from veil.core.state import Service, build_state
from veil.runtime.sources.jwks import fetch_jwks
from veil.waypoint.app import WaypointConfig, WaypointServer
from veil.waypoint.pipeline import Destination


class Pipe:
    """What the waypoint needs of an HBONE stream: receive, send, end."""

    def __init__(self) -> None:
        self.tx, self.rx = trio.open_memory_channel[bytes](100)
        self.out = bytearray()
        self.sent_eof = False
        self.reset_code: int | None = None

    async def receive(self) -> bytes:
        try:
            return await self.rx.receive()
        except trio.EndOfChannel:
            return b""

    async def send(self, data: Any) -> None:
        self.out += bytes(data)

    async def send_eof(self) -> None:
        self.sent_eof = True

    def reset(self, code: Any = None) -> None:
        self.reset_code = 8

    def close(self) -> None:
        pass


def waypoint(tmp_path: Path) -> WaypointServer:
    cfg = WaypointConfig(
        "waypoint", "shop", tmp_path, ("127.0.0.1", 1), tmp_path / "r", tmp_path / "t"
    )
    return WaypointServer(cfg)


DEST = Destination("10.96.0.5:80", Service("shop", "catalog", "10.96.0.5", ()), 80)


def with_state(wp: WaypointServer, *objects: dict[str, Any]) -> None:
    wp.store.update(build_state(list(objects), wp.store.current.version + 1, fetch_jwks))


async def feed(pipe: Pipe, *parts: bytes) -> None:
    """Send a client's bytes in parts, each once the waypoint has done all it can with the
    previous one (every other task blocked), then end the stream."""
    for p in parts:
        await pipe.tx.send(p)
        await trio.testing.wait_all_tasks_blocked()
    await pipe.tx.aclose()


def service_policy(
    name: str, action: str, operation: dict[str, Any], service: str = "catalog"
) -> dict[str, Any]:
    """An AuthorizationPolicy in namespace shop targeting a Service, with one `to` rule."""
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": service}],
            "action": action,
            "rules": [{"to": [{"operation": operation}]}],
        },
    }
