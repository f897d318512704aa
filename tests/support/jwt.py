"""Signing JWTs and publishing JWKS for tests (the waypoint only ever verifies)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _n(i: int, size: int | None = None) -> str:
    return b64(i.to_bytes(size or (i.bit_length() + 7) // 8, "big"))


class Issuer:
    def __init__(self, iss: str = "https://issuer.example", kind: str = "RS256") -> None:
        self.iss, self.alg, self.kid = iss, kind, f"k-{kind.lower()}"
        self.key: Any = (
            rsa.generate_private_key(65537, 2048)
            if kind.startswith("RS")
            else ec.generate_private_key(ec.SECP256R1())
        )

    def jwks(self) -> str:
        pub = self.key.public_key().public_numbers()
        if self.alg.startswith("RS"):
            jwk = {"kty": "RSA", "kid": self.kid, "n": _n(pub.n), "e": _n(pub.e)}
        else:
            jwk = {
                "kty": "EC",
                "kid": self.kid,
                "crv": "P-256",
                "x": _n(pub.x, 32),
                "y": _n(pub.y, 32),
            }
        return json.dumps({"keys": [jwk]})

    def token(self, sub: str = "alice", ttl: float = 600, **claims: Any) -> str:
        head = b64(json.dumps({"alg": self.alg, "kid": self.kid, "typ": "JWT"}).encode())
        body = {"iss": self.iss, "sub": sub, "exp": int(time.time() + ttl), **claims}
        payload = b64(json.dumps(body).encode())
        signed = f"{head}.{payload}".encode()
        if self.alg.startswith("RS"):
            sig = self.key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            r, s = decode_dss_signature(self.key.sign(signed, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{head}.{payload}.{b64(sig)}"
