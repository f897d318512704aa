"""The CA's signing rules; `openssl verify` (not our code) judges every issued chain."""

import base64
import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.pki import csr_with, intermediate_plugin
from veil.ca.signer import (
    CaSetupError,
    FileCaStorage,
    Signer,
    SignError,
    generate_root,
    load_or_create,
    load_plugin,
)
from veil.core.certs import pem
from veil.core.csr import build_csr, new_key
from veil.core.spiffe import SpiffeId

TD = "cluster.local"
FRONTEND = SpiffeId(TD, "shop", "frontend")


def openssl_verify(
    tmp_path: Path, roots: list[x509.Certificate], chain: list[x509.Certificate], purpose: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "roots.pem").write_text("".join(pem(c) for c in roots))
    (tmp_path / "leaf.pem").write_text(pem(chain[0]))
    (tmp_path / "untrusted.pem").write_text("".join(pem(c) for c in chain[1:]) or pem(chain[0]))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            str(tmp_path / "roots.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(generate_root(TD), TD)


def test_leaf_carries_exactly_the_identity_and_verifies_with_openssl(signer, tmp_path):
    key = new_key()
    csr = signer.check_csr(build_csr(key, FRONTEND), FRONTEND)
    issued = signer.sign(csr, FRONTEND, datetime.timedelta(hours=1))
    leaf = issued.leaf
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == [str(FRONTEND)]
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(minutes=59) < life <= datetime.timedelta(minutes=62)
    for purpose in ("sslclient", "sslserver"):
        out = openssl_verify(tmp_path, list(signer.material.roots), list(issued.chain), purpose)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "leaf.pem: OK" in out.stdout


def test_default_ttl_is_24h_and_capped(signer):
    csr = signer.check_csr(build_csr(new_key(), FRONTEND), FRONTEND)
    leaf = signer.sign(csr, FRONTEND).leaf
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(
        hours=24, minutes=1
    )
    capped = signer.sign(csr, FRONTEND, datetime.timedelta(days=400)).leaf
    assert capped.not_valid_after_utc - capped.not_valid_before_utc <= datetime.timedelta(
        hours=24, minutes=1
    )


@pytest.mark.parametrize(
    ("csr", "code"),
    [
        (b"garbage", "bad_csr"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "bad_csr",
        ),
        (
            csr_with(
                rsa.generate_private_key(65537, 2048),
                [x509.UniformResourceIdentifier(str(FRONTEND))],
            ),
            "bad_key_type",
        ),
        (
            csr_with(
                ec.generate_private_key(ec.SECP384R1()),
                [x509.UniformResourceIdentifier(str(FRONTEND))],
            ),
            "bad_key_type",
        ),
        (csr_with(new_key(), None), "san_mismatch"),
        (
            csr_with(
                new_key(),
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/admin")],
            ),
            "san_mismatch",
        ),
        (
            csr_with(
                new_key(),
                [x509.UniformResourceIdentifier(str(FRONTEND)), x509.DNSName("frontend.shop.svc")],
            ),
            "san_mismatch",
        ),
    ],
)
def test_bad_csrs_are_refused_with_400(signer, csr, code):
    with pytest.raises(SignError) as e:
        signer.check_csr(csr, FRONTEND)
    assert (e.value.status, e.value.code) == (400, code)


def test_a_certificate_is_not_a_csr(signer):
    with pytest.raises(SignError, match="not a PEM certificate signing request"):
        signer.check_csr(pem(signer.material.cert).encode(), FRONTEND)


@pytest.mark.parametrize(
    ("identity", "code"),
    [
        ("spiffe://other.domain/ns/shop/sa/frontend", "wrong_trust_domain"),
        ("spiffe://cluster.local/shop/frontend", "bad_identity"),
        ("frontend", "bad_identity"),
    ],
)
def test_bad_identities(signer, identity, code):
    with pytest.raises(SignError) as e:
        signer.parse_identity(identity)
    assert (e.value.status, e.value.code) == (400, code)


def test_restart_keeps_the_same_root(tmp_path):
    storage = FileCaStorage(tmp_path / "ca")
    first = load_or_create(storage, TD)
    second = load_or_create(FileCaStorage(tmp_path / "ca"), TD)
    assert first.cert == second.cert
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_plugin_intermediate_chains_to_the_operator_root(tmp_path):
    root = intermediate_plugin(tmp_path / "plugin")
    material = load_plugin(tmp_path / "plugin")
    assert material.plugged and material.roots == (root.cert,)
    signer = Signer(material, TD)
    csr = signer.check_csr(build_csr(new_key(), FRONTEND), FRONTEND)
    issued = signer.sign(csr, FRONTEND)
    assert issued.chain[1] == material.cert
    out = openssl_verify(tmp_path, [root.cert], list(issued.chain), "sslclient")
    assert out.returncode == 0, out.stdout + out.stderr
    # Without the intermediate, openssl must refuse: the chain really goes through it.
    out = openssl_verify(tmp_path, [root.cert], [issued.leaf], "sslclient")
    assert out.returncode != 0


def test_plugin_files_are_checked(tmp_path):
    intermediate_plugin(tmp_path / "a")
    intermediate_plugin(tmp_path / "b")
    (tmp_path / "a" / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(CaSetupError, match="does not match"):
        load_plugin(tmp_path / "a")
    intermediate_plugin(tmp_path / "c")
    (tmp_path / "c" / "root-cert.pem").write_bytes((tmp_path / "b" / "root-cert.pem").read_bytes())
    with pytest.raises(CaSetupError, match="does not chain"):
        load_plugin(tmp_path / "c")
    (tmp_path / "c" / "ca-cert.pem").unlink()
    with pytest.raises(CaSetupError, match="missing"):
        load_plugin(tmp_path / "c")


def corrupted_key_csr() -> bytes:
    """A CSR whose public key point is not on the curve (found by the `ca_request` fuzz
    harness: cryptography raises ValueError from `is_signature_valid`)."""
    key = new_key()
    der = x509.load_pem_x509_csr(build_csr(key, FRONTEND)).public_bytes(serialization.Encoding.DER)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    at = der.index(point)
    bad = der[: at + 1] + bytes([der[at + 1] ^ 0xFF]) + der[at + 2 :]
    return pem_csr_der(bad)


def pem_csr_der(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def version_62_csr() -> bytes:
    """A CSR of version 62 (the `ca_request` harness: cryptography raises InvalidVersion,
    which is not a ValueError)."""
    der = x509.load_pem_x509_csr(build_csr(new_key(), FRONTEND)).public_bytes(
        serialization.Encoding.DER
    )
    at = der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version, the first INTEGER
    return pem_csr_der(der[:at] + b"\x02\x01\x3e" + der[at + 3 :])


@pytest.mark.parametrize("make", [corrupted_key_csr, version_62_csr])
def test_csrs_cryptography_cannot_read_are_bad_csrs_not_500s(signer, make):
    with pytest.raises(SignError) as e:
        signer.check_csr(make(), FRONTEND)
    assert (e.value.status, e.value.code) == (400, "bad_csr")
