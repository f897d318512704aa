"""Remote JWKS at the waypoint (issue 22.3): an https jwksUri or OIDC discovery from the
issuer, fetched over real TLS (a local HTTPS server on loopback), cached, refreshed, kept while
the provider is away, refused (401) before the first fetch and when too stale."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.jwt import Issuer
from veil.core.jwt import JwtError, authenticate, parse_request_authentication
from veil.runtime.sources import jwks


def server_cert(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


class Provider:
    """An identity provider on https://127.0.0.1:<port>: path -> (status, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str]] = {}
        self.hits: list[str] = []
        self.url = ""

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            self.hits.append(path)
            status, body = self.routes.get(path, (404, "not found"))
            raw = body.encode()
            head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(raw)}\r\nconnection: close\r\n"
            await stream.send_all(head.encode() + b"\r\n" + raw)
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def provider(
    tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[tuple[Provider, ssl.SSLContext]]:
    cert, key = server_cert(tmp_path)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)
    p = Provider()
    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, p.handle, 0, sctx, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    p.url = f"https://127.0.0.1:{port}"
    yield p, ssl.create_default_context(cafile=str(cert))


def policy(**rule: Any) -> Any:
    return parse_request_authentication(
        {
            "apiVersion": "security.veil.dev/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Service", "name": "catalog"}], "jwtRules": [rule]},
        }
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_an_https_jwks_uri_is_fetched_and_a_token_then_accepted(provider):
    p, ctx = provider
    iss = Issuer()
    p.routes["/keys"] = (200, iss.jwks())
    ra = policy(issuer=iss.iss, jwksUri=f"{p.url}/keys")
    cache = jwks.JwksCache(lambda: [ra], ctx=ctx)
    with pytest.raises(JwtError, match="not available yet"):  # before the first fetch
        authenticate([ra], bearer(iss.token()), None, cache.keys_for)
    await cache.refresh_due()
    who = authenticate([ra], bearer(iss.token()), None, cache.keys_for)
    assert who is not None and who.principal == f"{iss.iss}/alice"
    assert authenticate([ra], {}, None, cache.keys_for) is None  # no token: not refused


async def test_oidc_discovery_from_the_issuer(provider):
    p, ctx = provider
    iss = Issuer(iss=p.url)
    p.routes["/.well-known/openid-configuration"] = (
        200,
        json.dumps({"jwks_uri": f"{p.url}/certs"}),
    )
    p.routes["/certs"] = (200, iss.jwks())
    ra = policy(issuer=iss.iss)  # neither jwks nor jwksUri: discovery, as Istio
    cache = jwks.JwksCache(lambda: [ra], ctx=ctx)
    await cache.refresh_due()
    assert authenticate([ra], bearer(iss.token()), None, cache.keys_for) is not None
    assert p.hits == ["/.well-known/openid-configuration", "/certs"]


async def test_keys_are_kept_while_the_provider_is_away_then_refused_when_too_stale(provider):
    p, ctx = provider
    iss = Issuer()
    p.routes["/keys"] = (200, iss.jwks())
    ra = policy(issuer=iss.iss, jwksUri=f"{p.url}/keys")
    cache = jwks.JwksCache(lambda: [ra], ctx=ctx, refresh=0.0, max_stale=3600)
    await cache.refresh_due()
    p.routes["/keys"] = (503, "down")
    await cache.refresh_due()  # the refresh fails: the last keys stay
    entry = cache.entries[jwks.source_of(ra.rules[0])]
    assert "HTTP 503" in entry.error
    assert authenticate([ra], bearer(iss.token()), None, cache.keys_for) is not None
    cache.max_stale = 0.0
    with pytest.raises(JwtError, match="not available"):
        authenticate([ra], bearer(iss.token()), None, cache.keys_for)


async def test_a_key_rotation_is_picked_up_at_the_next_refresh(provider):
    p, ctx = provider
    old, new = Issuer(), Issuer()
    p.routes["/keys"] = (200, old.jwks())
    ra = policy(issuer=old.iss, jwksUri=f"{p.url}/keys")
    cache = jwks.JwksCache(lambda: [ra], ctx=ctx, refresh=0.0)
    await cache.refresh_due()
    p.routes["/keys"] = (200, new.jwks())
    await cache.refresh_due()
    assert authenticate([ra], bearer(new.token()), None, cache.keys_for) is not None
    with pytest.raises(JwtError):
        authenticate([ra], bearer(old.token()), None, cache.keys_for)


async def test_an_untrusted_provider_certificate_gets_no_keys(provider):
    p, _ = provider
    iss = Issuer()
    p.routes["/keys"] = (200, iss.jwks())
    ra = policy(issuer=iss.iss, jwksUri=f"{p.url}/keys")
    cache = jwks.JwksCache(lambda: [ra], ctx=ssl.create_default_context())  # system CAs only
    await cache.refresh_due()
    assert "SSL" in cache.entries[jwks.source_of(ra.rules[0])].error
    with pytest.raises(JwtError, match="not available yet"):
        authenticate([ra], bearer(iss.token()), None, cache.keys_for)


@pytest.mark.parametrize(
    "doc", ['{"jwks_uri": "http://idp/keys"}', "{}", "not json", '{"jwks_uri": 5}']
)
def test_discovery_documents_without_an_https_jwks_uri_are_refused(doc):
    with pytest.raises(JwtError):
        jwks.jwks_uri_from_discovery(doc)


@pytest.mark.parametrize(
    "rule",
    [
        {"issuer": "https://idp", "jwksUri": "http://idp/keys"},  # keys open to tampering
        {"issuer": "idp.example"},  # no keys, and no https issuer to discover them from
    ],
)
def test_rules_without_a_trustworthy_key_source_are_refused(rule):
    with pytest.raises(JwtError):
        policy(**rule)
