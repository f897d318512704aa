"""The mesh CA's key material and signing rules (no sockets here).

A CA is either self-signed (created on first start and persisted through a `CaStorage`) or
an operator-supplied intermediate in Istio's plug-in layout: `ca-cert.pem` (the signing
certificate), `ca-key.pem`, `root-cert.pem` (the trust bundle) and `cert-chain.pem` (from the
signing certificate up towards the root). Leaves are ECDSA P-256, carry the identity as their
only URI SAN and are usable as TLS client and server certificates.
"""

from __future__ import annotations

import base64
import datetime
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.core.certs import is_ca, key_usage, pem, verify_chain
from veil.core.csr import spki
from veil.core.spiffe import IdentityError, SpiffeId

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
ROOT_VALIDITY = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=1)
DEFAULT_TTL = datetime.timedelta(hours=24)


class CaSetupError(RuntimeError):
    """CA material that cannot be used; the message names the file and the problem."""


class SignError(Exception):
    """A request the CA refuses: carries the HTTP status and a machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class CaMaterial:
    key: CaKey
    cert: x509.Certificate  # signs leaves
    chain: tuple[x509.Certificate, ...]  # above `cert`, up to (not including) a root
    roots: tuple[x509.Certificate, ...]  # the trust bundle
    plugged: bool = False

    def bundle_pem(self) -> list[str]:
        return [pem(c) for c in self.roots]


@dataclass(frozen=True)
class Issued:
    identity: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    serial: int

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def generate_root(trust_domain: str, now: datetime.datetime | None = None) -> CaMaterial:
    now = now or utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Veil"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"veil root ({trust_domain})"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            key_usage(ca=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CaMaterial(key=key, cert=cert, chain=(), roots=(cert,))


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise CaSetupError(f"{path}: missing") from None
    except ValueError as e:
        raise CaSetupError(f"{path}: not PEM certificates ({e})") from None
    return certs


def _load_key(path: Path) -> CaKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CaSetupError(f"{path}: missing") from None
    except (ValueError, TypeError) as e:
        raise CaSetupError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaSetupError(f"{path}: CA keys must be ECDSA or RSA")
    return key


def load_plugin(directory: Path) -> CaMaterial:
    """An operator-supplied intermediate CA in Istio's plug-in layout, checked before use."""
    certs = _load_certs(directory / "ca-cert.pem")
    if not certs:
        raise CaSetupError(f"{directory / 'ca-cert.pem'}: no certificate")
    cert = certs[0]
    key = _load_key(directory / "ca-key.pem")
    roots = _load_certs(directory / "root-cert.pem")
    chain = _load_certs(directory / "cert-chain.pem")
    if not is_ca(cert):
        raise CaSetupError(
            f"{directory / 'ca-cert.pem'}: not a CA certificate "
            "(BasicConstraints CA:TRUE is required)"
        )
    if spki(cert) != spki(key):
        raise CaSetupError(f"{directory / 'ca-key.pem'} does not match {directory / 'ca-cert.pem'}")
    root_fps = {r.fingerprint(hashes.SHA256()) for r in roots}
    above = [
        c
        for c in chain
        if c.fingerprint(hashes.SHA256()) not in root_fps
        and c.fingerprint(hashes.SHA256()) != cert.fingerprint(hashes.SHA256())
    ]
    try:
        verify_chain([cert, *above], roots)
    except ValueError as e:
        raise CaSetupError(
            f"{directory}: ca-cert.pem does not chain to root-cert.pem through cert-chain.pem: {e}"
        ) from None
    return CaMaterial(key=key, cert=cert, chain=tuple(above), roots=tuple(roots), plugged=True)


class CaStorage(Protocol):
    """Where a self-signed CA keeps its root (lab: files; Kubernetes: a Secret)."""

    def load(self) -> CaMaterial | None: ...

    def save(self, material: CaMaterial) -> CaMaterial:
        """Store `material` unless another replica stored a root first: what is stored."""


class FileCaStorage:
    """`root-cert.pem` and `ca-key.pem` (mode 0600) in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self) -> CaMaterial | None:
        cert_file, key_file = self.directory / "root-cert.pem", self.directory / "ca-key.pem"
        if not cert_file.exists() and not key_file.exists():
            return None
        (cert,) = _load_certs(cert_file)[:1]
        key = _load_key(key_file)
        if spki(cert) != spki(key):
            raise CaSetupError(f"{key_file} does not match {cert_file}")
        return CaMaterial(key=key, cert=cert, chain=(), roots=(cert,))

    def save(self, material: CaMaterial) -> CaMaterial:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(self.directory / "ca-key.pem", key_pem(material.key), 0o600)
        _write(self.directory / "root-cert.pem", pem(material.cert).encode(), 0o644)
        return material


def key_pem(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def material_from_pem(cert_pem: bytes, key_data: bytes, where: str) -> CaMaterial:
    """A self-signed root and its key, checked to belong together."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise CaSetupError(f"{where}: not a PEM root and key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaSetupError(f"{where}: CA keys must be ECDSA or RSA")
    if not certs or spki(certs[0]) != spki(key):
        raise CaSetupError(f"{where}: the key does not match the root certificate")
    return CaMaterial(key=key, cert=certs[0], chain=(), roots=(certs[0],))


class SecretCaStorage:
    """Kubernetes: the root and its key in a Secret (`ca-key.pem`, `root-cert.pem`), made on
    the first start; a replica that finds it made meanwhile (409) uses that one, so every
    replica signs with the same root."""

    def __init__(self, client: Any, namespace: str, name: str = "veil-ca") -> None:
        self.client, self.namespace, self.name = client, namespace, name

    def load(self) -> CaMaterial | None:
        from lightkube import ApiError  # noqa: PLC0415
        from lightkube.resources.core_v1 import Secret  # noqa: PLC0415

        try:
            secret = self.client.get(Secret, self.name, namespace=self.namespace)
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise CaSetupError(f"Secret {self.namespace}/{self.name}: {e}") from None
        data = secret.data or {}
        if "root-cert.pem" not in data or "ca-key.pem" not in data:
            raise CaSetupError(
                f"Secret {self.namespace}/{self.name}: needs root-cert.pem and ca-key.pem"
            )
        return material_from_pem(
            base64.b64decode(data["root-cert.pem"]),
            base64.b64decode(data["ca-key.pem"]),
            f"Secret {self.namespace}/{self.name}",
        )

    def save(self, material: CaMaterial) -> CaMaterial:
        from lightkube import ApiError  # noqa: PLC0415
        from lightkube.models.meta_v1 import ObjectMeta  # noqa: PLC0415
        from lightkube.resources.core_v1 import Secret  # noqa: PLC0415

        secret = Secret(
            metadata=ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                labels={"app.kubernetes.io/managed-by": "veil"},
            ),
            type="Opaque",
            data={
                "root-cert.pem": base64.b64encode(pem(material.cert).encode()).decode(),
                "ca-key.pem": base64.b64encode(key_pem(material.key)).decode(),
            },
        )
        try:
            self.client.create(secret)
            return material
        except ApiError as e:
            if e.status.code != 409:
                raise CaSetupError(f"Secret {self.namespace}/{self.name}: {e}") from None
        stored = self.load()  # another replica was first: use its root
        if stored is None:
            raise CaSetupError(f"Secret {self.namespace}/{self.name}: vanished while created")
        return stored


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    tmp.replace(path)


def load_or_create(
    storage: CaStorage, trust_domain: str, plugin_dir: Path | None = None
) -> CaMaterial:
    if plugin_dir is not None:
        return load_plugin(plugin_dir)
    material = storage.load()
    if material is None:  # the first start: whichever replica stores first, all use that
        material = storage.save(generate_root(trust_domain))
    return material


class Signer:
    """Checks CSRs against the identity asked for and signs leaves."""

    def __init__(
        self,
        material: CaMaterial,
        trust_domain: str,
        default_ttl: datetime.timedelta = DEFAULT_TTL,
        max_ttl: datetime.timedelta | None = None,
    ) -> None:
        self.material = material
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl or max(default_ttl, DEFAULT_TTL)

    def parse_identity(self, identity: str) -> SpiffeId:
        try:
            sid = SpiffeId.parse(identity)
        except IdentityError as e:
            raise SignError(400, "bad_identity", str(e)) from None
        if sid.trust_domain != self.trust_domain:
            raise SignError(
                400,
                "wrong_trust_domain",
                f"identity {sid} is not in this CA's trust domain {self.trust_domain!r}",
            )
        return sid

    def check_csr(self, csr_pem: bytes, identity: SpiffeId) -> x509.CertificateSigningRequest:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, x509.InvalidVersion):
            raise SignError(400, "bad_csr", "not a PEM certificate signing request") from None
        try:  # parsed lazily: a key off its curve, an unknown algorithm raise only here
            valid = csr.is_signature_valid
            key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise SignError(400, "bad_csr", f"the CSR's key cannot be read: {e}") from None
        if not valid:
            raise SignError(400, "bad_csr", "the CSR's signature does not verify")
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
            raise SignError(
                400, "bad_key_type", f"workload keys must be ECDSA P-256, got {_key_name(key)}"
            )
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise SignError(
                400, "san_mismatch", f"the CSR has no SAN; it must carry exactly {identity}"
            ) from None
        names = [str(n.value) for n in sans]
        if names != [str(identity)] or uri_sans_of(sans) != [str(identity)]:
            raise SignError(
                400,
                "san_mismatch",
                f"the CSR's SANs {names} differ from the requested identity "
                f"{identity}: it must carry exactly that URI and nothing else",
            )
        return csr

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        identity: SpiffeId,
        ttl: datetime.timedelta | None = None,
        now: datetime.datetime | None = None,
    ) -> Issued:
        now = now or utcnow()
        ttl = min(ttl or self.default_ttl, self.max_ttl)
        not_after = min(now + ttl, self.material.cert.not_valid_after_utc)
        serial = int.from_bytes(secrets.token_bytes(16), "big") >> 1
        ca = self.material.cert
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca.subject)
            .public_key(csr.public_key())
            .serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                key_usage(ca=False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # An empty subject makes the SAN critical (RFC 5280 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.material.key.public_key()),
                critical=False,
            )
            .sign(self.material.key, hashes.SHA256())
        )
        return Issued(identity=identity, chain=(leaf, ca, *self.material.chain), serial=serial)

    def server_certificate(
        self,
        identity: SpiffeId,
        dns_names: Sequence[str],
        key: ec.EllipticCurvePrivateKey,
        ttl: datetime.timedelta = ROOT_VALIDITY / 10,
    ) -> Issued:
        """The CA's own serving certificate: its SPIFFE ID plus DNS names to dial it by."""
        now = utcnow()
        ca = self.material.cert
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + ttl, ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(str(identity)),
                        *(x509.DNSName(d) for d in dns_names),
                    ]
                ),
                critical=False,
            )
            .sign(self.material.key, hashes.SHA256())
        )
        return Issued(identity=identity, chain=(cert, ca, *self.material.chain), serial=0)


def uri_sans_of(sans: x509.SubjectAlternativeName) -> list[str]:
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


def _key_name(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__
