"""Watch the lab's underlay: which TCP flows cross it, and whether a payload shows in clear.

An AF_PACKET socket on one node's port of the underlay bridge (`node1` in
`veil-<lab>-underlay`) sees every frame that node exchanges with the others (a socket on `br0`
itself would only see frames addressed to the bridge, not those it forwards). The demo and
the tests use it to show that, once a namespace is enrolled, its traffic crosses nodes only
as TLS on port 15008 and a request's bytes never appear in plaintext.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from veil.agent.capture.netns import NetNs
from veil.lab.plan import UNDERLAY_CIDR

ETH_P_ALL = 0x0003
T = TypeVar("T")
CONTROL_PLANE = str(UNDERLAY_CIDR.network_address + 2)  # veil-<lab>-cp: API server, CA


@dataclass(frozen=True)
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes = field(repr=False)


def parse_frame(frame: bytes) -> Segment | None:
    """A TCP segment from an Ethernet frame carrying IPv4, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6 or len(ip) < ihl + 20:
        return None
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    sport, dport = struct.unpack("!HH", tcp[:4])
    offset = (tcp[12] >> 4) * 4
    return Segment(
        socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport, bytes(tcp[offset:])
    )


class Sniffer:
    """Collect TCP segments seen on one interface of one netns while a block runs."""

    def __init__(self, netns_path: str, interface: str = "node1") -> None:
        self.netns_path, self.interface = netns_path, interface
        self.segments: list[Segment] = []
        self._stop = threading.Event()

    def _loop(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            while ready:
                try:
                    frame = sock.recv(65536)
                except BlockingIOError:
                    break
                seg = parse_frame(frame)
                if seg is not None:
                    self.segments.append(seg)

    def during(self, fn: Callable[[], T]) -> T:
        ns = NetNs(self.netns_path)
        try:
            sock = ns.socket(
                socket.AF_PACKET, socket.SOCK_RAW, mark=False, proto=socket.htons(ETH_P_ALL)
            )
        finally:
            ns.close()
        sock.bind((self.interface, 0))
        thread = threading.Thread(target=self._loop, args=(sock,), daemon=True)
        thread.start()
        try:
            return fn()
        finally:
            time.sleep(0.1)  # let the last frames arrive
            self._stop.set()
            thread.join()
            sock.close()

    def flows(self, control_plane: bool = False) -> set[tuple[str, str, int]]:
        """(source, destination, destination port) of client-to-server segments seen; the
        nodes' own traffic to the control plane (kubelet heartbeats and watches to the API
        server, certificate requests to the CA, at any moment) only if asked for."""
        return {
            (s.src, s.dst, s.dport)
            for s in self.segments
            if s.dport < s.sport and (control_plane or s.dst != CONTROL_PLANE)
        }

    def plaintext(self, marker: bytes) -> list[Segment]:
        return [s for s in self.segments if marker in s.payload]

    def bytes_by_port(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.segments:
            port = min(s.sport, s.dport)
            out[port] = out.get(port, 0) + len(s.payload)
        return out
