"""Reading a RequestAuthentication's `jwksUri` for the state's writer (the core parses, this
does the I/O). `file://` only for now: a JWKS fetched over HTTPS, cached and refreshed, is
issue 22's; any other scheme is refused with a clear error, never skipped."""

from __future__ import annotations

from pathlib import Path

from veil.core.jwt import JwtError

MAX_JWKS = 1 << 20


def fetch_jwks(uri: str) -> str:
    if not uri.startswith("file://"):
        raise JwtError(f"{uri!r}: only file:// URIs are supported")
    path = Path(uri[len("file://") :])
    with path.open("rb") as f:
        data = f.read(MAX_JWKS + 1)
    if len(data) > MAX_JWKS:
        raise JwtError(f"{uri}: larger than {MAX_JWKS} bytes")
    return data.decode("utf-8", "replace")
