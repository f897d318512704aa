"""Certificate checks both ends of certificate issuance need (the CA signing, the agent's
certificate manager accepting what it got), with no I/O."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_chain(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime.datetime | None = None,
) -> None:
    """Check each certificate is issued by the next, in date, up to one of the roots.

    Raises ValueError naming the first broken link.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    for i, cert in enumerate(chain):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            name = cert.subject.rfc4514_string() or "leaf"
            raise ValueError(
                f"certificate {i} ({name}) is not valid now, {now:%Y-%m-%d %H:%M:%S} UTC "
                f"by this host's clock (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC): if it was just "
                "issued, this host's clock is wrong"
            )
        if i > 0 and not is_ca(cert):
            raise ValueError(f"certificate {i} ({cert.subject.rfc4514_string()}) is not a CA")
        for root in roots:
            if root.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(root)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return
        if i + 1 < len(chain):
            try:
                cert.verify_directly_issued_by(chain[i + 1])
            except (ValueError, TypeError, InvalidSignature) as e:
                raise ValueError(
                    f"certificate {i} is not issued by certificate {i + 1}: {e or 'bad signature'}"
                ) from None
    raise ValueError("the chain does not lead to any certificate of the trust bundle")


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """digitalSignature, and for a CA keyCertSign and cRLSign: all any Veil certificate
    needs (the mesh CA's root and leaves, the lab's Kubernetes PKI)."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
