"""Seeded PKI helpers shared by tests: an operator root with an intermediate, CSRs of any kind."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from veil.ca.signer import CaMaterial, generate_root
from veil.core.certs import pem
from veil.core.spiffe import SpiffeId


def intermediate_plugin(directory: Path, trust_domain: str = "cluster.local") -> CaMaterial:
    """Write Istio's plug-in CA files (an intermediate under a fresh operator root)."""
    root = generate_root(trust_domain)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_text(pem(cert))
    (directory / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "root-cert.pem").write_text(pem(root.cert))
    (directory / "cert-chain.pem").write_text(pem(cert) + pem(root.cert))
    return root


def csr_with(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, names: list[x509.GeneralName] | None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def mesh_cert(lab: str, node: str, identity: SpiffeId, where: Path) -> tuple[Path, Path, Path]:
    """A certificate for `identity` from a lab's CA, asked for with `node`'s credential (as
    that node's agent would): (cert chain, key, trust bundle) files in `where`."""
    from veil.core.csr import build_csr, key_pem, new_key  # noqa: PLC0415
    from veil.lab import controlplane  # noqa: PLC0415

    key = new_key()
    status, doc = controlplane.ca_request(
        lab, node, {"identity": str(identity), "csr": build_csr(key, identity).decode()}
    )
    assert status == 200, doc
    (where / "cert.pem").write_text("".join(doc["certChain"]))
    (where / "key.pem").write_bytes(key_pem(key))
    (where / "root.pem").write_text("".join(doc["trustBundle"]))
    return where / "cert.pem", where / "key.pem", where / "root.pem"


def mesh_client_context(lab: str, node: str, identity: SpiffeId, where: Path) -> ssl.SSLContext:
    """A TLS client context holding `identity`'s mesh certificate (see `mesh_cert`), for
    speaking HBONE to an agent by hand."""
    cert, key, root = mesh_cert(lab, node, identity, where)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the agent's certificate names a SPIFFE id
    ctx.load_verify_locations(root)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx
