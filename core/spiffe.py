"""SPIFFE IDs as Veil uses them: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

DEFAULT_TRUST_DOMAIN = "cluster.local"
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class IdentityError(ValueError):
    """A SPIFFE ID or certificate identity that is malformed or not the one expected."""


def check_trust_domain(td: str) -> str:
    if not _TRUST_DOMAIN.match(td):
        raise IdentityError(
            f"invalid trust domain {td!r}: lowercase letters, digits, '.', '-' and '_' only"
        )
    return td


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        for what, value in (
            ("namespace", self.namespace),
            ("service account", self.service_account),
        ):
            if not _SEGMENT.match(value) or len(value) > 253:
                raise IdentityError(f"invalid {what} {value!r} in a SPIFFE ID")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def istio_principal(self) -> str:
        """The form AuthorizationPolicy `principals` use: `<td>/ns/<ns>/sa/<sa>`."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not uri.startswith("spiffe://"):
            raise IdentityError(f"{uri!r} is not a SPIFFE ID (must start with spiffe://)")
        td, _, path = uri[len("spiffe://") :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError(
                f"{uri!r} is not of the form "
                "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        return cls(td, parts[1], parts[3])


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE identity a workload certificate carries."""
    uris = uri_sans(cert)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise IdentityError(
            f"the certificate carries {len(spiffe)} SPIFFE URI SANs "
            f"({', '.join(uris) or 'none'}); a workload certificate has one"
        )
    return SpiffeId.parse(spiffe[0])
