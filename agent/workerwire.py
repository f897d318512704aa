"""What an agent's control process and its workers say to each other, and its framing.

Sans-IO: `encode()` makes a frame, `Decoder` takes bytes and the file descriptors that
arrived with them (SCM_RIGHTS) and gives messages back. A frame is a 4-byte length and a
pickle: both ends are the same program, over a socketpair no one else holds; nothing from
the network is ever unpickled. Listening sockets travel as descriptors beside the frame of
the `Serve` that names them; the kernel delivers them with that frame's first bytes, so a
FIFO of received descriptors matches them to their message.
"""

from __future__ import annotations

import pickle
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from veil.core.spiffe import SpiffeId
from veil.core.state import MeshState, Workload
from veil.runtime.identity.copies import CredentialCopy

FRAME = struct.Struct("!I")
MAX_FRAME = 1 << 30


class WireError(Exception):
    """The other end broke the protocol (a bug in one of them): the channel is closed."""


# -- control -> worker -----------------------------------------------------------------------


@dataclass(frozen=True)
class SetState:
    state: MeshState
    policies_changed: bool = True  # live connections are judged again


@dataclass(frozen=True)
class SetCredentials:
    copies: tuple[CredentialCopy, ...]
    gone: tuple[SpiffeId, ...] = ()


@dataclass(frozen=True)
class Serve:
    """Serve a pod's listeners (`nfds` descriptors travel with this frame); answered by
    `Done(seq)`."""

    seq: int
    workload: Workload
    netns: str
    ip: str
    nfds: int
    fds: list[int] = field(default_factory=list, compare=False)  # filled in on receipt


@dataclass(frozen=True)
class Stop:
    key: str


@dataclass(frozen=True)
class HandOver:
    pass


@dataclass(frozen=True)
class Ask:
    """How are you? Answered by `Stats(seq)`; with `metrics` False (the drain's polling), the
    answer leaves out the metric families, the costly part to collect and pickle."""

    seq: int
    metrics: bool = True


# -- worker -> control -----------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    seq: int
    error: str | None = None


@dataclass(frozen=True)
class Stats:
    seq: int
    active: int
    outbound: int
    inbound: int
    handled: int  # connections accepted since the worker started
    snapshot: int  # the version of the cluster state it has
    identities: tuple[str, ...]  # whose certificates it holds
    metrics: list[Any] | None  # prometheus_client Metric families (None: not asked for)


@dataclass(frozen=True)
class Want:
    """A certificate the worker needs and has not got: the control process fetches it."""

    identity: SpiffeId


def encode(msg: object) -> bytes:
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload)) + payload


class Decoder:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def messages(self) -> Iterator[object]:
        """Every complete message fed so far; a `Serve` with its descriptors attached."""
        while len(self._buf) >= FRAME.size:
            (size,) = FRAME.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise WireError(f"a frame of {size} bytes")
            if len(self._buf) < FRAME.size + size:
                return
            payload = bytes(self._buf[FRAME.size : FRAME.size + size])
            del self._buf[: FRAME.size + size]
            try:
                msg = pickle.loads(payload)
            except Exception as e:
                raise WireError(f"an unreadable frame: {e!r}") from None
            if isinstance(msg, Serve):
                if len(self._fds) < msg.nfds:
                    raise WireError(f"Serve of {msg.workload.key} came without its sockets")
                msg.fds.extend(self._fds.popleft() for _ in range(msg.nfds))
            yield msg

    def leftover_fds(self) -> list[int]:
        """Descriptors no message claimed (to be closed)."""
        out = list(self._fds)
        self._fds.clear()
        return out
