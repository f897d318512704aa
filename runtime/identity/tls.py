"""TLS contexts for mesh identities, and the SPIFFE check Python's ssl module cannot do.

Contexts are TLS 1.3 only with ALPN h2, and always verify the peer's chain against the mesh
trust bundle (server role: client certificates required). The ssl module checks chains but
not URI SANs, so every caller runs `verify_peer()` right after the handshake: the client role
checks the server is one of the identities it expects, the server role checks the client
belongs to the trust domain; on mismatch the caller closes the connection.

Keys reach OpenSSL through a private temporary directory (mode 0700, files 0600, in /dev/shm
when it exists) that is removed right after loading: Python can only load keys from files.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.core.spiffe import IdentityError, SpiffeId, identity_of

ALPN = ["h2"]


class PeerIdentityError(ssl.SSLError):
    """The peer completed TLS with a chain from our roots but is not who we expected."""


def _pem_chain(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def load_identity(
    ctx: ssl.SSLContext,
    chain: Sequence[x509.Certificate],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> None:
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="veil-tls-", dir=shm) as d:
        cert_file, key_file = Path(d) / "chain.pem", Path(d) / "key.pem"
        cert_file.write_bytes(_pem_chain(chain))
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(
                fd,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
        finally:
            os.close(fd)
        ctx.load_cert_chain(cert_file, key_file)


def mesh_context(
    server_side: bool,
    chain: Sequence[x509.Certificate],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    bundle_pem: str,
) -> ssl.SSLContext:
    """TLS 1.3, ALPN h2, our identity, and the peer's chain verified against the mesh bundle
    (a server requires a client certificate). Peer identities: `verify_peer()`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(ALPN)
    ctx.check_hostname = False  # identities are URI SANs, not host names
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem)
    load_identity(ctx, chain, key)
    return ctx


def plain_server_context(
    chain: Sequence[x509.Certificate], key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> ssl.SSLContext:
    """Server TLS without client certificates (the CA: clients authenticate with a token)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    load_identity(ctx, chain, key)
    return ctx


def ca_client_context(bundle_pem: str) -> ssl.SSLContext:
    """Dialling the CA: verify its chain and its DNS name against the trust bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=bundle_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def peer_certificate(sslobj: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate:
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    return x509.load_der_x509_certificate(der)


def tunnel_expiry(sslobj: ssl.SSLObject | ssl.SSLSocket, own_not_after: float) -> float:
    """When a tunnel's authentication runs out: the earlier of the two ends' certificates. A
    pooled tunnel lives far longer than a handshake; past this it takes no new stream, so an
    identity that is no longer renewed does not live on in connections made while it was."""
    return min(peer_certificate(sslobj).not_valid_after_utc.timestamp(), own_not_after)


def verify_peer(
    sslobj: ssl.SSLObject | ssl.SSLSocket,
    *,
    expected: Collection[SpiffeId] | None = None,
    trust_domain: str | None = None,
) -> SpiffeId:
    """The peer's SPIFFE identity, if it is one we accept; PeerIdentityError otherwise."""
    try:
        peer = identity_of(peer_certificate(sslobj))
    except IdentityError as e:
        raise PeerIdentityError(f"peer certificate has no usable SPIFFE identity: {e}") from None
    if trust_domain is not None and peer.trust_domain != trust_domain:
        raise PeerIdentityError(f"peer {peer} is outside trust domain {trust_domain!r}")
    if expected is not None and peer not in expected:
        want = ", ".join(sorted(map(str, expected))) or "nothing"
        raise PeerIdentityError(f"peer identity {peer} is not the expected {want}")
    return peer
