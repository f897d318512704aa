"""Reading a RequestAuthentication's keys (the core parses, this does the I/O).

- `fetch_jwks(uri)`: a `file://` jwksUri, read by the state's writer when it parses the
  object (the keys are then part of the state).
- `JwksCache`: the keys of `https://` jwksUris and of issuers with OIDC discovery
  (`<issuer>/.well-known/openid-configuration` -> its `jwks_uri`), fetched by the waypoint
  itself, not the writer: a slow or unreachable identity provider never holds up the state.
  It follows the state (a new issuer is fetched at once), refreshes every `refresh` seconds
  (Istio's default is 20 min; 5 min here, so a key rotation reaches the waypoints sooner),
  retries failures with a doubling delay, and keeps serving the last keys it fetched while
  the provider is away, for at most `max_stale`. Until the first fetch succeeded, a token of
  that issuer is refused (401): fail closed. Only https; the provider's certificate is
  verified against the system's CAs, or `$VEIL_JWKS_CA` (a PEM file).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from veil.core.jwt import Jwk, JwtError, JwtRule, RequestAuthentication, parse_jwks
from veil.runtime import http

log = logging.getLogger("veil.jwks")
MAX_JWKS = 1 << 20
FETCH_TIMEOUT = 10.0


def fetch_jwks(uri: str) -> str:
    if not uri.startswith("file://"):
        raise JwtError(f"{uri!r}: only file:// URIs are read here (https:// by the waypoint)")
    path = Path(uri[len("file://") :])
    with path.open("rb") as f:
        data = f.read(MAX_JWKS + 1)
    if len(data) > MAX_JWKS:
        raise JwtError(f"{uri}: larger than {MAX_JWKS} bytes")
    return data.decode("utf-8", "replace")


def source_of(rule: JwtRule) -> str:
    """What a remote rule's keys are cached under: its jwksUri, or its issuer (discovery)."""
    return rule.remote or f"oidc:{rule.issuer}"


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def jwks_uri_from_discovery(doc: str) -> str:
    """The `jwks_uri` of an OpenID provider configuration document; https only."""
    try:
        conf = json.loads(doc)
    except ValueError as e:
        raise JwtError(f"OpenID configuration is not JSON: {e}") from None
    uri = conf.get("jwks_uri") if isinstance(conf, dict) else None
    if not isinstance(uri, str) or not uri.startswith("https://"):
        raise JwtError(f"OpenID configuration has no https jwks_uri (got {uri!r})")
    return uri


def default_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("VEIL_JWKS_CA") or None)


async def https_get(url: str, ctx: ssl.SSLContext, timeout: float = FETCH_TIMEOUT) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise JwtError(f"{url!r}: https:// URLs only")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    with trio.fail_after(timeout):
        stream = await trio.open_ssl_over_tcp_stream(
            parts.hostname, parts.port or 443, ssl_context=ctx, https_compatible=True
        )
        async with stream:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as e:  # the cause says why: an SSLError mostly
                raise JwtError(f"{url}: TLS failed: {e.__cause__ or e}") from None
            status, _, body = await http.request(
                stream,
                "GET",
                target,
                host,
                headers={"accept": "application/json"},
                max_body=MAX_JWKS,
            )
    if status != 200:
        raise JwtError(f"{url}: HTTP {status}")
    return body.decode("utf-8", "replace")


@dataclass
class _Entry:
    keys: tuple[Jwk, ...] | None = None
    fetched: float = 0.0  # monotonic, of the last success
    next_try: float = 0.0  # monotonic
    delay: float = 1.0  # after a failure, doubling
    error: str = ""


class JwksCache:
    """Remote keys by source (`source_of`), for `jwt.authenticate(remote_keys=...)`."""

    def __init__(
        self,
        rules: Callable[[], Sequence[RequestAuthentication]],
        *,
        refresh: float = 300.0,
        max_stale: float = 24 * 3600.0,
        ctx: ssl.SSLContext | None = None,
        get: Callable[[str, ssl.SSLContext], Awaitable[str]] | None = None,
    ) -> None:
        self.rules = rules
        self.refresh, self.max_stale = refresh, max_stale
        self.ctx = ctx or default_context()
        self._get = get or https_get
        self.entries: dict[str, _Entry] = {}

    def keys_for(self, rule: JwtRule) -> Sequence[Jwk] | None:
        e = self.entries.get(source_of(rule))
        if e is None or e.keys is None:
            return None
        if time.monotonic() - e.fetched > self.max_stale:
            return None  # too old to trust: refused until the provider answers again
        return e.keys

    def _sources(self) -> dict[str, JwtRule]:
        return {source_of(r): r for p in self.rules() for r in p.rules if r.remote or r.discover}

    async def _fetch(self, rule: JwtRule) -> tuple[Jwk, ...]:
        uri = rule.remote
        if not uri:
            uri = jwks_uri_from_discovery(await self._get(discovery_url(rule.issuer), self.ctx))
        return tuple(parse_jwks(await self._get(uri, self.ctx)))

    async def refresh_due(self) -> None:
        """Fetch every source that is new, due for refresh, or due for a retry."""
        now = time.monotonic()
        sources = self._sources()
        for gone in set(self.entries) - set(sources):
            del self.entries[gone]
        for source, rule in sorted(sources.items()):
            e = self.entries.setdefault(source, _Entry())
            if now < e.next_try:
                continue
            try:
                e.keys = await self._fetch(rule)
            except (
                OSError,
                JwtError,
                ssl.SSLError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                ValueError,
            ) as err:
                e.error = f"{type(err).__name__}: {err}"
                e.next_try = now + e.delay
                e.delay = min(e.delay * 2, self.refresh)
                log.warning(
                    "JWKS of %s not fetched (%s); %s", source, e.error,
                    "keeping the keys fetched before" if e.keys else "its tokens are refused",
                )  # fmt: skip
                continue
            e.fetched, e.error, e.delay = now, "", 1.0
            e.next_try = now + self.refresh
            log.info("JWKS of %s: %d key(s)", source, len(e.keys))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:  # a new issuer in the state is fetched within a second
            await self.refresh_due()
            await trio.sleep(1.0)
