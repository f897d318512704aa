"""RequestAuthentication at the waypoint, pure: JWKS, JWT validation, and the policy object.

Istio's semantics: a request without a token passes unauthenticated (an AuthorizationPolicy
can require `requestPrincipals`); a request with a token that does not validate is refused
(401); a valid token gives the request principal `<iss>/<sub>` and its claims to policies.
Signatures: RS256/384/512 and ES256/384 (`cryptography`); `alg: none` and HMAC are refused.

    apiVersion: security.veil.dev/v1
    kind: RequestAuthentication
    metadata: {name: jwt, namespace: shop}
    spec:
      targetRefs: [{kind: Service, name: catalog}]     # or the waypoint's Gateway
      jwtRules:
        - issuer: https://issuer.example
          audiences: [catalog]                          # optional
          jwks: '{"keys": [...]}'                       # inline, or
          jwksUri: file:///etc/veil/jwks.json           # a file the waypoint can read
          fromHeaders: [{name: Authorization, prefix: "Bearer "}]   # the default
          fromParams: [access_token]                    # a query parameter instead
          fromCookies: [session]                        # or a cookie
          forwardOriginalToken: false                   # the default: removed upstream
          outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from veil.core.objects import refuse_odd_shapes

API_VERSION = "security.veil.dev/v1"
KIND = "RequestAuthentication"
SKEW = 60.0  # seconds of clock difference tolerated for exp/nbf
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}


class JwtError(ValueError):
    """A token that does not validate (the request gets 401) or a rule that cannot be read."""


def b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _int(data: str) -> int:
    return int.from_bytes(b64url(data), "big")


@dataclass(frozen=True)
class Jwk:
    kid: str | None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def parse_jwks(text: str) -> list[Jwk]:
    try:
        doc = json.loads(text)
        out = []
        for k in doc["keys"]:
            if k.get("kty") == "RSA":
                key: Any = rsa.RSAPublicNumbers(_int(k["e"]), _int(k["n"])).public_key()
            elif k.get("kty") == "EC" and k.get("crv") in _CURVES:
                key = ec.EllipticCurvePublicNumbers(
                    _int(k["x"]), _int(k["y"]), _CURVES[k["crv"]]()
                ).public_key()
            else:
                continue  # key types we do not verify with are skipped, as Envoy does
            out.append(Jwk(k.get("kid"), key))
    except (ValueError, KeyError, TypeError) as e:
        raise JwtError(f"JWKS cannot be read: {e}") from None
    if not out:
        raise JwtError("JWKS has no RSA or EC (P-256, P-384) key")
    return out


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    keys: tuple[Jwk, ...]
    audiences: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = (("authorization", "Bearer "),)
    params: tuple[str, ...] = ()  # fromParams: query parameters that may carry the token
    cookies: tuple[str, ...] = ()  # fromCookies: cookies that may carry it
    forward: bool = False  # forwardOriginalToken (Istio's default: the token is removed)
    # Keys fetched by the waypoint (runtime/sources/jwks.py), not in `keys`: an https
    # jwksUri, or "" with `discover` (OIDC discovery from the issuer, as Istio without either).
    remote: str = ""
    discover: bool = False
    claim_headers: tuple[tuple[str, str], ...] = ()  # outputClaimToHeaders: (header, claim)


@dataclass(frozen=True)
class Authenticated:
    principal: str  # "<iss>/<sub>"
    claims: Mapping[str, Any] = field(default_factory=dict)
    rule: JwtRule | None = None
    header: str | None = None  # where the token was found: a header name ...
    param: str | None = None  # ... or a query parameter
    cookie: str | None = None  # ... or a cookie


def _verify_signature(alg: str, key: Any, signed: bytes, sig: bytes) -> None:
    digest = _HASHES.get(alg[2:])
    if digest is None:
        raise JwtError(f"unsupported alg {alg!r}")
    try:
        if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signed, padding.PKCS1v15(), digest())
        elif alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(sig) // 2
            der = encode_dss_signature(
                int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
            )
            key.verify(der, signed, ec.ECDSA(digest()))
        else:
            raise JwtError(f"alg {alg!r} does not fit the key")
    except InvalidSignature:
        raise JwtError("bad signature") from None


def validate(
    token: str,
    rule: JwtRule,
    now: float | None = None,
    keys: Sequence[Jwk] | None = None,
) -> Authenticated:
    """The token's principal and claims, or JwtError saying why not. `keys`: the rule's
    fetched keys when they are remote (else its own)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT (expected header.payload.signature)")
    try:
        header = json.loads(b64url(parts[0]))
        claims = json.loads(b64url(parts[1]))
        sig = b64url(parts[2])
    except ValueError:
        raise JwtError("not a JWT (bad base64 or JSON)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("not a JWT (header and payload must be objects)")
    alg = str(header.get("alg", ""))
    if not alg.startswith(("RS", "ES")):
        raise JwtError(f"alg {alg!r} is not accepted (RS256/384/512, ES256/384)")
    if claims.get("iss") != rule.issuer:
        raise JwtError(f"issuer {claims.get('iss')!r} is not {rule.issuer!r}")
    kid = header.get("kid")
    candidates = [
        k for k in (rule.keys if keys is None else keys) if kid is None or k.kid in (None, kid)
    ]
    if not candidates:
        raise JwtError(f"no key {kid!r} in the JWKS")
    signed = f"{parts[0]}.{parts[1]}".encode()
    errors = []
    for k in candidates:
        try:
            _verify_signature(alg, k.key, signed, sig)
            break
        except JwtError as e:
            errors.append(str(e))
    else:
        raise JwtError(errors[0])
    t = time.time() if now is None else now
    if isinstance(claims.get("exp"), int | float) and t > claims["exp"] + SKEW:
        raise JwtError("token expired")
    if isinstance(claims.get("nbf"), int | float) and t < claims["nbf"] - SKEW:
        raise JwtError("token not valid yet")
    if rule.audiences:
        aud = claims.get("aud")
        got = aud if isinstance(aud, list) else [aud]
        if not any(a in rule.audiences for a in got):
            raise JwtError(f"audience {aud!r} is not one of {list(rule.audiences)}")
    return Authenticated(f"{claims['iss']}/{claims.get('sub', '')}", claims)


@dataclass(frozen=True)
class RequestAuthentication:
    namespace: str
    name: str
    target_refs: tuple[tuple[str, str], ...]
    rules: tuple[JwtRule, ...]

    def applies(
        self,
        namespace: str,
        gateway: str,
        services: Collection[str],
        service_namespace: str | None = None,
    ) -> bool:
        """Targets this waypoint (in its namespace) or an addressed Service (in the
        Service's namespace: the waypoint's own unless shared across namespaces)."""
        svc_ns = service_namespace or namespace
        return any(
            (k == "Gateway" and n == gateway and self.namespace == namespace)
            or (k == "Service" and n in services and self.namespace == svc_ns)
            for k, n in self.target_refs
        )


FetchJwks = Callable[[str], str]  # a jwksUri -> the JWKS document; raises OSError or JwtError


@refuse_odd_shapes(JwtError, lambda ref, e: JwtError(f"{KIND} {ref}: cannot read: {e!r}"))
def parse_request_authentication(
    obj: Mapping[str, Any], fetch_jwks: FetchJwks | None = None
) -> RequestAuthentication:
    """`fetch_jwks` reads a `jwksUri` (the caller's I/O: this module does none); without one
    only inline `jwks` can be read."""
    md = obj.get("metadata") or {}
    ns, name = md.get("namespace", "default"), md.get("name", "?")
    where = f"{KIND} {ns}/{name}: spec"
    spec = obj.get("spec") or {}
    refs = tuple((str(t.get("kind")), str(t.get("name"))) for t in spec.get("targetRefs") or [])
    if not refs or any(k not in ("Gateway", "Service") for k, _ in refs):
        raise JwtError(f"{where}.targetRefs: a Gateway or Service (waypoints enforce this)")
    rules = []
    for i, r in enumerate(spec.get("jwtRules") or []):
        rw = f"{where}.jwtRules[{i}]"
        if not r.get("issuer"):
            raise JwtError(f"{rw}.issuer: required")
        remote, discover = "", False
        text = ""
        uri = str(r.get("jwksUri") or "")
        if r.get("jwks"):
            text = str(r["jwks"])
        elif uri.startswith("https://"):
            remote = uri  # fetched, cached and refreshed by the waypoint
        elif uri.startswith("http://"):
            raise JwtError(f"{rw}.jwksUri: https:// only (keys must not be open to tampering)")
        elif r.get("jwksUri"):
            if fetch_jwks is None:
                raise JwtError(f"{rw}.jwksUri: cannot be fetched here")
            try:
                text = fetch_jwks(str(r["jwksUri"]))
            except OSError as e:
                raise JwtError(f"{rw}.jwksUri: {e}") from None
            except JwtError as e:
                raise JwtError(f"{rw}.jwksUri: {e}") from None
        elif str(r["issuer"]).startswith("https://"):
            discover = True  # OIDC discovery: <issuer>/.well-known/openid-configuration
        else:
            raise JwtError(
                f"{rw}: jwks (inline), jwksUri (https:// or file://), or an https:// issuer "
                "(OIDC discovery) is required"
            )
        try:
            keys = parse_jwks(text) if text else []
        except JwtError as e:
            raise JwtError(f"{rw}.jwks: {e}") from None
        params = tuple(str(p) for p in r.get("fromParams") or [])
        cookies = r.get("fromCookies") or []
        if not isinstance(cookies, list) or not all(isinstance(c, str) and c for c in cookies):
            raise JwtError(f"{rw}.fromCookies: a list of cookie names")
        headers = tuple(
            (str(h["name"]).lower(), str(h.get("prefix", ""))) for h in r.get("fromHeaders") or []
        ) or (() if params or cookies else (("authorization", "Bearer "),))
        forward = r.get("forwardOriginalToken", False)
        if not isinstance(forward, bool):
            raise JwtError(f"{rw}.forwardOriginalToken: true or false")
        claim_headers = []
        for j, o in enumerate(r.get("outputClaimToHeaders") or []):
            if not isinstance(o, dict) or not o.get("header") or not o.get("claim"):
                raise JwtError(f"{rw}.outputClaimToHeaders[{j}]: {{header: ..., claim: ...}}")
            claim_headers.append((str(o["header"]).lower(), str(o["claim"])))
        rules.append(
            JwtRule(
                str(r["issuer"]),
                tuple(keys),
                tuple(str(a) for a in r.get("audiences") or []),
                headers=headers,
                params=params,
                cookies=tuple(cookies),
                forward=forward,
                claim_headers=tuple(claim_headers),
                remote=remote,
                discover=discover,
            )
        )
    if not rules:
        raise JwtError(f"{where}.jwtRules: at least one rule")
    return RequestAuthentication(ns, name, refs, tuple(rules))


RemoteKeys = Callable[[JwtRule], Sequence[Jwk] | None]  # fetched keys; None: not (yet) known


def authenticate(
    policies: Sequence[RequestAuthentication],
    headers: Mapping[str, str],
    query: Mapping[str, str] | None = None,
    remote_keys: RemoteKeys | None = None,
) -> Authenticated | None:
    """None: no token in the places the rules name (unauthenticated, not refused).
    JwtError: a token is present and no rule accepts it (a rule whose remote keys are not
    known yet accepts none: fail closed)."""
    errors = []
    found = False
    for p in policies:
        for rule in p.rules:
            # (header, query parameter, cookie) where a token was found, and the token
            places: list[tuple[str | None, str | None, str | None, str]] = []
            for name, prefix in rule.headers:
                value = headers.get(name)
                if value is not None and value.startswith(prefix):
                    places.append((name, None, None, value[len(prefix) :].strip()))
            for param in rule.params:
                if query and param in query:
                    places.append((None, param, None, query[param]))
            if rule.cookies and (jar := cookies(headers.get("cookie", ""))):
                for cookie in rule.cookies:
                    if cookie in jar:
                        places.append((None, None, cookie, jar[cookie]))
            keys: Sequence[Jwk] | None = None
            if places and (rule.remote or rule.discover):
                keys = remote_keys(rule) if remote_keys is not None else None
                if keys is None:
                    found = True
                    errors.append(f"the JWKS of issuer {rule.issuer} is not available yet")
                    continue
            for in_header, in_param, in_cookie, token in places:
                found = True
                try:
                    who = validate(token, rule, keys=keys)
                except JwtError as e:
                    errors.append(str(e))
                    continue
                return Authenticated(
                    who.principal, who.claims, rule, in_header, in_param, in_cookie
                )
    if found:
        raise JwtError(errors[0] if len(errors) == 1 else "; ".join(errors))
    return None


def cookies(header: str) -> dict[str, str]:
    """A Cookie header's pairs (RFC 6265 section 5.4; HTTP/2's split fields joined with "; "
    before). A name given twice: the first counts, as Envoy's cookie lookup. Quotes around a
    value are removed."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name and name not in out:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            out[name] = value
    return out


def upstream_request(
    policies: Sequence[RequestAuthentication],
    who: Authenticated | None,
    headers: list[tuple[str, str]],
    target: str,
) -> tuple[list[tuple[str, str]], str]:
    """What is forwarded after authentication, as Istio does: the validated token removed
    unless its rule says `forwardOriginalToken: true`, and `outputClaimToHeaders` set from the
    claims. Those output headers are always removed from what the client sent, so a client
    without a token cannot pose as one with a claim."""
    drop = {h for p in policies for r in p.rules for h, _ in r.claim_headers}
    add: list[tuple[str, str]] = []
    if who is not None and who.rule is not None:
        if not who.rule.forward and who.header:
            drop.add(who.header)
        for header, claim in who.rule.claim_headers:
            value = _claim(who.claims, claim)
            if value is not None:
                add.append((header, value))
        if not who.rule.forward and who.param:
            path, _, qs = target.partition("?")
            kept = [
                kv for kv in qs.split("&") if kv and unquote_plus(kv.split("=")[0]) != who.param
            ]
            target = path + ("?" + "&".join(kept) if kept else "")
        if not who.rule.forward and who.cookie:
            headers = _without_cookie(headers, who.cookie)
    if drop:
        headers = [(n, v) for n, v in headers if n.lower() not in drop]
    return headers + add, target


def _without_cookie(headers: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """The request's Cookie fields without cookie `name` (every occurrence); a field left
    empty is dropped."""
    out = []
    for n, v in headers:
        if n.lower() != "cookie":
            out.append((n, v))
            continue
        kept = [c for c in v.split(";") if c.strip().partition("=")[0] != name]
        if any(c.strip() for c in kept):
            out.append((n, ";".join(kept).strip()))
    return out


def _claim(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim's value for a header: nested claims by `.`, lists joined by commas."""
    node: Any = claims
    for part in name.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None or isinstance(node, dict):
        return None
    if isinstance(node, list):
        return ",".join(str(x) for x in node)
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)
