"""Certificates another process keeps fresh, copied in: an agent's workers serve with the
credentials their control process fetched, and never talk to the CA themselves.

`Certificates` is what a proxy needs of either (`CertificateManager` or `CertificateCopies`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.core.spiffe import SpiffeId
from veil.runtime.identity.manager import Credential, NoCertificate


class Certificates(Protocol):
    def current(self, sid: SpiffeId) -> Credential | None: ...

    async def get(self, sid: SpiffeId, timeout: float = 5.0) -> Credential: ...


@dataclass(frozen=True)
class CredentialCopy:
    """A credential as bytes, to cross a process boundary (key objects do not pickle)."""

    identity: SpiffeId
    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    bundle_pem: str
    fetched_at: float

    @classmethod
    def of(cls, cred: Credential) -> CredentialCopy:
        return cls(
            cred.identity,
            cred.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            tuple(c.public_bytes(serialization.Encoding.PEM) for c in cred.chain),
            cred.bundle_pem,
            cred.fetched_at,
        )

    def credential(self) -> Credential:
        key = serialization.load_pem_private_key(self.key_pem, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"the key of {self.identity} is not an EC key")
        return Credential(
            self.identity,
            key,
            tuple(x509.load_pem_x509_certificate(p) for p in self.chain_pem),
            self.bundle_pem,
            self.fetched_at,
        )


class CertificateCopies:
    """Credentials pushed in by `update()`; `get()` of one not here yet asks for it (`want`,
    once per identity) and waits, bounded, as `CertificateManager.get` does."""

    def __init__(
        self,
        want: Callable[[SpiffeId], None] = lambda sid: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._want, self._clock = want, clock
        self._creds: dict[SpiffeId, Credential] = {}
        self._asked: set[SpiffeId] = set()
        self._changed = trio.Event()

    def update(self, copies: Iterable[CredentialCopy], gone: Iterable[SpiffeId] = ()) -> None:
        for sid in gone:
            self._creds.pop(sid, None)
            self._asked.discard(sid)
        for copy in copies:
            self._creds[copy.identity] = copy.credential()
        self._changed.set()
        self._changed = trio.Event()

    def identities(self) -> list[SpiffeId]:
        return list(self._creds)

    def current(self, sid: SpiffeId) -> Credential | None:
        cred = self._creds.get(sid)
        return cred if cred is not None and cred.valid(self._clock()) else None

    async def get(self, sid: SpiffeId, timeout: float = 5.0) -> Credential:
        cred = self.current(sid)
        if cred is not None:
            return cred
        if sid not in self._asked:
            self._asked.add(sid)
            self._want(sid)
        with trio.move_on_after(timeout):
            while (cred := self.current(sid)) is None:
                await self._changed.wait()
            return cred
        raise NoCertificate(f"no certificate for {sid} after {timeout:g}s from the agent")
