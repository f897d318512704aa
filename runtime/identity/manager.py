"""The certificate manager: one certificate per identity the node serves, always fresh.

Theory of operation: `set_identities()` (called on every new cluster snapshot) starts one
maintenance task per identity in the manager's nursery and cancels the tasks of identities
that left. A maintenance task generates a fresh P-256 key and CSR, asks the CA, verifies the
answer (the chain leads to the bundle, the leaf carries exactly that identity and our key),
stores it, and sleeps until half its lifetime has passed. On failure it retries with
exponential backoff (0.5 s doubling to 150 s) while the old certificate keeps being served
until it expires. `get()` returns a valid credential, starting a fetch on demand for an
identity it did not know and waiting (bounded) for it.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from veil.core.certs import pem, verify_chain
from veil.core.csr import build_csr, new_key, spki
from veil.core.spiffe import IdentityError, SpiffeId, identity_of, uri_sans
from veil.runtime.identity.tls import mesh_context

log = logging.getLogger("veil.identity")

# identity, csr PEM -> the CA's JSON answer (certChain, trustBundle)
Fetcher = Callable[[SpiffeId, bytes], Awaitable[dict[str, Any]]]

BACKOFF_START = 0.5
BACKOFF_MAX = 150.0
WALL_CHECK = 30.0  # seconds between looks at the wall clock while waiting to renew


class NoCertificate(Exception):
    """No valid certificate for an identity could be had in time."""


class Backoff:
    """0.5 s, 1 s, 2 s, ... capped at 150 s; reset after a success."""

    def __init__(self, start: float = BACKOFF_START, cap: float = BACKOFF_MAX) -> None:
        self.start, self.cap, self._next = start, cap, start

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.start


@dataclass(frozen=True)
class Credential:
    identity: SpiffeId
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    bundle_pem: str = field(repr=False)
    fetched_at: float  # Unix time

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @cached_property
    def not_after(self) -> float:  # checked on every proxied connection: parse it once
        return self.leaf.not_valid_after_utc.timestamp()

    @property
    def refresh_at(self) -> float:
        """Half of the remaining lifetime at the time it was fetched."""
        return self.fetched_at + (self.not_after - self.fetched_at) / 2

    def valid(self, now: float) -> bool:
        return now < self.not_after

    @cached_property
    def server_context(self) -> ssl.SSLContext:
        return mesh_context(True, self.chain, self.key, self.bundle_pem)

    @cached_property
    def client_context(self) -> ssl.SSLContext:
        return mesh_context(False, self.chain, self.key, self.bundle_pem)

    def metadata(self) -> dict[str, Any]:
        """What may be shown (admin, status): never the key."""
        return {
            "identity": str(self.identity),
            "serial": f"{self.leaf.serial_number:x}",
            "notBefore": self.leaf.not_valid_before_utc.isoformat(),
            "notAfter": self.leaf.not_valid_after_utc.isoformat(),
            "refreshAt": datetime.datetime.fromtimestamp(self.refresh_at, datetime.UTC).isoformat(),
            "certChain": [pem(c) for c in self.chain],
        }


def check_answer(
    identity: SpiffeId, key: ec.EllipticCurvePrivateKey, answer: dict[str, Any], now: float
) -> Credential:
    """Verify what the CA returned before trusting it with our traffic."""
    try:
        chain = [x509.load_pem_x509_certificate(p.encode()) for p in answer["certChain"]]
        bundle_pems = [str(p) for p in answer["trustBundle"]]
        roots = [x509.load_pem_x509_certificate(p.encode()) for p in bundle_pems]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IdentityError(f"the CA's answer is malformed: {e!r}") from None
    if not chain or not roots:
        raise IdentityError("the CA's answer has an empty chain or trust bundle")
    leaf = chain[0]
    if uri_sans(leaf) != [str(identity)] or identity_of(leaf) != identity:
        raise IdentityError(f"the CA returned a certificate for {uri_sans(leaf)}, not {identity}")
    if spki(leaf) != spki(key):
        raise IdentityError("the CA returned a certificate for another key")
    try:
        verify_chain(chain, roots, datetime.datetime.fromtimestamp(now, datetime.UTC))
    except ValueError as e:
        raise IdentityError(f"the CA's chain does not verify to its trust bundle: {e}") from None
    return Credential(
        identity=identity,
        key=key,
        chain=tuple(chain),
        bundle_pem="".join(bundle_pems),
        fetched_at=now,
    )


class CertificateManager:
    def __init__(
        self,
        fetch: Fetcher,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._creds: dict[SpiffeId, Credential] = {}
        self._tasks: dict[SpiffeId, trio.CancelScope] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._errors: dict[SpiffeId, str] = {}
        self._wake: dict[SpiffeId, trio.Event] = {}  # a maintenance task's sleep, cut short
        reg = registry or CollectorRegistry()
        self._expiry = Gauge(
            "veil_identity_cert_expiry_timestamp_seconds",
            "When the current certificate of an identity expires (Unix time)",
            ["identity"],
            registry=reg,
        )
        self._fetches = Counter(
            "veil_identity_cert_fetches", "Certificate fetches by result", ["result"], registry=reg
        )
        Gauge(
            "veil_identity_cert_renewals_failing",
            "Identities whose last certificate fetch failed (retried with backoff)",
            registry=reg,
        ).set_function(lambda: len(self._errors))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the maintenance tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def set_identities(self, identities: Iterable[SpiffeId]) -> None:
        """Prefetch every identity given; forget the ones no longer on the node."""
        wanted = set(identities)
        for sid in list(self._tasks):
            if sid not in wanted:
                self._tasks.pop(sid).cancel()
                self._creds.pop(sid, None)
                self._errors.pop(sid, None)
                self._expiry.remove(str(sid))
        for sid in wanted:
            self._ensure(sid)

    def _ensure(self, sid: SpiffeId) -> None:
        if sid in self._tasks:
            return
        if self._nursery is None:
            raise RuntimeError("CertificateManager.run() is not running (this is a bug)")
        scope = trio.CancelScope()
        self._tasks[sid] = scope
        self._nursery.start_soon(self._maintain, sid, scope)

    def failing(self) -> dict[SpiffeId, str]:
        """Identities whose last fetch failed, and why (their retry is under way)."""
        return dict(self._errors)

    def current(self, sid: SpiffeId) -> Credential | None:
        """The identity's certificate if it is valid now; one that expired while its task
        slept (the clock stepped forward) has it renewed at once."""
        cred = self._creds.get(sid)
        if cred is None:
            return None
        if cred.valid(self._clock()):
            return cred
        if (wake := self._wake.get(sid)) is not None:
            wake.set()
        return None

    async def get(self, sid: SpiffeId, timeout: float = 5.0) -> Credential:
        """A valid credential, fetched on demand if needed; NoCertificate after `timeout`."""
        cred = self.current(sid)
        if cred is not None:  # the hot path: no cancel scope, no scheduling
            return cred
        self._ensure(sid)
        with trio.move_on_after(timeout):
            while (cred := self.current(sid)) is None:
                await self._changed.wait()
            return cred
        reason = self._errors.get(sid, "no answer from the CA yet")
        raise NoCertificate(f"no certificate for {sid} after {timeout:g}s: {reason}")

    def credentials(self) -> dict[SpiffeId, Credential]:
        """Every credential in hand (valid or not): what an agent's workers get copies of."""
        return dict(self._creds)

    async def wait_changed(self) -> None:
        """Until the next credential arrives."""
        await self._changed.wait()

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for sid in sorted(self._tasks):
            cred = self._creds.get(sid)
            entry: dict[str, Any] = {"identity": str(sid), "state": "pending"}
            if cred is not None:
                entry = {**cred.metadata(), "state": "valid" if cred.valid(now) else "expired"}
            if sid in self._errors:
                entry["lastError"] = self._errors[sid]
            out.append(entry)
        return out

    def _publish(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _maintain(self, sid: SpiffeId, scope: trio.CancelScope) -> None:
        backoff = Backoff()
        with scope:
            while True:
                key = new_key()
                try:
                    answer = await self._fetch(sid, build_csr(key, sid))
                    cred = check_answer(sid, key, answer, self._clock())
                except Exception as e:
                    delay = backoff.next()
                    self._errors[sid] = str(e)
                    self._fetches.labels(result="error").inc()
                    old = self._creds.get(sid)
                    if old is not None and not old.valid(self._clock()):
                        del self._creds[sid]  # never serve an expired certificate
                    log.warning(
                        "certificate for %s: %s; retrying in %.1fs%s",
                        sid,
                        e,
                        delay,
                        " (the current certificate stays in use until it expires)"
                        if self.current(sid)
                        else "",
                    )
                    self._publish()
                    await trio.sleep(delay)
                    continue
                backoff.reset()
                self._errors.pop(sid, None)
                self._creds[sid] = cred
                self._fetches.labels(result="ok").inc()
                self._expiry.labels(identity=str(sid)).set(cred.not_after)
                log.info(
                    "certificate for %s: serial %x, valid until %s",
                    sid,
                    cred.leaf.serial_number,
                    cred.leaf.not_valid_after_utc.isoformat(),
                )
                self._publish()
                await self._sleep_until(sid, cred.refresh_at)

    async def _sleep_until(self, sid: SpiffeId, when: float) -> None:
        """Sleep until a wall-clock time, looking at the clock every WALL_CHECK seconds: trio
        sleeps on the monotonic clock, so a node whose clock jumps past `when` (an NTP step,
        a VM resumed) would otherwise keep an expired certificate for the rest of the sleep.
        Asking for the identity's certificate (`current()`, `get()`) once it has expired ends
        the sleep at once."""
        wake = self._wake[sid] = trio.Event()
        try:
            while (left := when - self._clock()) > 0 and not wake.is_set():
                with trio.move_on_after(min(left, WALL_CHECK)):
                    await wake.wait()
        finally:
            if self._wake.get(sid) is wake:
                del self._wake[sid]
