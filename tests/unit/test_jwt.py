"""RequestAuthentication: JWKS, token validation, Istio's pass/refuse semantics (pure)."""

from __future__ import annotations

import time

import pytest

from tests.support.jwt import Issuer, b64
from veil.core.jwt import (
    JwtError,
    RequestAuthentication,
    authenticate,
    cookies,
    parse_request_authentication,
    upstream_request,
    validate,
)
from veil.core.routes import RequestFacts
from veil.runtime.sources.jwks import fetch_jwks


def ra(issuer: Issuer, **rule: object) -> RequestAuthentication:
    return parse_request_authentication(
        {
            "apiVersion": "security.veil.dev/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "catalog"}],
                "jwtRules": [{"issuer": issuer.iss, "jwks": issuer.jwks(), **rule}],
            },
        },
        fetch_jwks,
    )


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_valid_token_gives_principal_and_claims(alg):
    iss = Issuer(kind=alg)
    policy = ra(iss, audiences=["catalog"])
    got = authenticate(
        [policy], {"authorization": "Bearer " + iss.token(aud="catalog", team="blue")}
    )
    assert got is not None and got.principal == "https://issuer.example/alice"
    assert got.claims["team"] == "blue"
    assert authenticate([policy], {}) is None  # no token: unauthenticated, not refused


def test_tokens_that_must_be_refused():
    iss, other = Issuer(), Issuer()
    policy = ra(iss, audiences=["catalog"])
    rule = policy.rules[0]
    cases = {
        "bad signature": other.token(aud="catalog"),
        "token expired": iss.token(aud="catalog", ttl=-3600),
        "audience": iss.token(aud="billing"),
        "issuer": Issuer(iss="https://evil.example").token(aud="catalog"),
        "not a JWT": "abc.def",
        "is not accepted": b64(b'{"alg":"none"}')
        + "."
        + b64(b'{"iss":"https://issuer.example"}')
        + ".",
    }
    for why, token in cases.items():
        with pytest.raises(JwtError, match=why):
            validate(token, rule, now=time.time())
        with pytest.raises(JwtError):
            authenticate([policy], {"authorization": "Bearer " + token})


def test_jwks_from_a_file_and_errors_name_the_field(tmp_path):
    iss = Issuer()
    (tmp_path / "jwks.json").write_text(iss.jwks())
    policy = ra(iss, jwks=None, jwksUri=f"file://{tmp_path}/jwks.json")
    assert authenticate([policy], {"authorization": "Bearer " + iss.token()}) is not None
    with pytest.raises(JwtError, match=r"RequestAuthentication shop/jwt: spec.jwtRules\[0\]"):
        ra(Issuer(iss="issuer.example"), jwks=None)  # no keys, no https issuer to discover
    remote = ra(iss, jwks=None, jwksUri="https://idp/jwks").rules[0]  # the waypoint fetches
    assert (remote.remote, remote.keys) == ("https://idp/jwks", ())
    assert ra(iss, jwks=None).rules[0].discover  # an https issuer alone: OIDC discovery
    with pytest.raises(JwtError, match=r"jwksUri: 'ftp://idp/jwks': only file://"):
        ra(iss, jwks=None, jwksUri="ftp://idp/jwks")
    with pytest.raises(JwtError, match=r"jwksUri: .*No such file"):
        ra(iss, jwks=None, jwksUri=f"file://{tmp_path}/missing.json")


# -- what goes upstream (issue 17.17: Istio's forwardOriginalToken defaults to false) ------------


def test_the_token_is_removed_upstream_by_default():
    iss = Issuer()
    p = ra(iss)
    headers = [("authorization", "Bearer " + iss.token()), ("x-a", "1")]
    who = authenticate([p], dict(headers))
    out, target = upstream_request([p], who, headers, "/x?y=1")
    assert out == [("x-a", "1")] and target == "/x?y=1"


def test_forward_original_token_keeps_it():
    iss = Issuer()
    p = ra(iss, forwardOriginalToken=True)
    headers = [("authorization", "Bearer " + iss.token())]
    out, _ = upstream_request([p], authenticate([p], dict(headers)), headers, "/")
    assert out == headers


def test_a_token_from_a_query_parameter_is_removed_from_the_query():
    iss = Issuer()
    p = ra(iss, fromParams=["access_token"])
    token = iss.token()
    who = authenticate([p], {}, {"access_token": token})
    assert who is not None and who.principal == f"{iss.iss}/alice"
    _, target = upstream_request([p], who, [], f"/x?a=1&access_token={token}&b=2")
    assert target == "/x?a=1&b=2"
    assert authenticate([p], {"authorization": "Bearer " + token}) is None  # only the param


def test_a_token_from_a_cookie_in_any_spelling_is_found_and_removed_upstream():
    """fromCookies (Istio's RequestAuthentication): the cookie found among others, in one
    Cookie field or split in several (HTTP/2), quoted or not; it is removed upstream and the
    other cookies stay; the Authorization header is not looked at."""
    iss = Issuer()
    p = ra(iss, fromCookies=["session"])
    token = iss.token()
    for fields in (
        [("cookie", f"theme=dark; session={token}; lang=en")],
        [("cookie", "theme=dark"), ("Cookie", f"session={token}"), ("cookie", "lang=en")],
        [("cookie", f'theme=dark;session="{token}"  ;lang=en')],
    ):
        facts = RequestFacts.of("GET", "/", fields)
        who = authenticate([p], facts.headers)
        assert who is not None and who.principal == f"{iss.iss}/alice" and who.cookie == "session"
        out, _ = upstream_request([p], who, fields, "/")
        joined = "; ".join(v for n, v in out if n.lower() == "cookie")
        assert "session" not in joined and "theme=dark" in joined and "lang=en" in joined
    assert authenticate([p], {"authorization": "Bearer " + token}) is None  # only the cookie
    with pytest.raises(JwtError):  # a bad token in the cookie is refused, not ignored
        authenticate([p], {"cookie": "session=not.a.jwt"})


def test_the_first_cookie_of_a_name_counts():
    assert cookies("a=1; b=2; a=3") == {"a": "1", "b": "2"}
    assert cookies('x="q"; ; bad; =v; y=') == {"x": "q", "y": ""}


@pytest.mark.parametrize("value", ["session", [""], [3], {"a": 1}])
def test_bad_from_cookies_is_refused(value):
    with pytest.raises(JwtError, match="fromCookies"):
        ra(Issuer(), fromCookies=value)


def test_claims_go_to_headers_and_a_client_cannot_forge_them():
    iss = Issuer()
    p = ra(iss, outputClaimToHeaders=[{"header": "x-jwt-team", "claim": "team"}])
    forged = [("x-jwt-team", "admins")]
    out, _ = upstream_request([p], None, forged, "/")  # no token: the header is dropped
    assert out == []
    headers = [("authorization", "Bearer " + iss.token(team="blue")), *forged]
    out, _ = upstream_request([p], authenticate([p], dict(headers)), headers, "/")
    assert out == [("x-jwt-team", "blue")]


@pytest.mark.parametrize(
    "rule",
    [{"forwardOriginalToken": "yes"}, {"outputClaimToHeaders": [{"header": "x"}]}],
)
def test_bad_forwarding_fields_are_refused(rule):
    with pytest.raises(JwtError):
        ra(Issuer(), **rule)


@pytest.mark.parametrize(
    "spec",
    [  # found by tests/fuzz (policies): these raised AttributeError/TypeError, not JwtError
        {"targetRefs": ["x"], "jwtRules": [{"issuer": "i"}]},
        {"targetRefs": [{"kind": "Service", "name": "a"}], "jwtRules": ["x"]},
        {"targetRefs": 5},
    ],
)
def test_odd_shapes_are_refused_with_jwt_error(spec):
    with pytest.raises(JwtError):
        parse_request_authentication(
            {
                "apiVersion": "security.veil.dev/v1",
                "kind": "RequestAuthentication",
                "metadata": {"name": "jwt", "namespace": "shop"},
                "spec": spec,
            }
        )
