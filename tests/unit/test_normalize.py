"""Request-target normalization (issue 17.11), table-tested with the cases of Istio's own
normalization reference (tests/integration/security/normalization_test.go in istio/istio:
its expectations, our code). Istio's client strips `#foo` before sending; a raw fragment
that reaches the waypoint is refused instead."""

from __future__ import annotations

import urllib.parse

import pytest

from veil.waypoint.normalize import (
    BadTarget,
    PathNormalization,
    normalize_authority,
    normalize_target,
)

N = PathNormalization

ISTIO = {
    N.NONE: [
        ("/", "/"),
        ("/app/", "/app/"),
        ("/app/../admin", "/app/../admin"),
        ("/app", "/app"),
        ("/app//", "/app//"),
        ("/app/%2f", "/app/%2f"),
        ("/app%2f/", "/app%2f/"),
        ("/xyz%30..//abc", "/xyz%30..//abc"),
        ("/app/%2E./admin", "/app/%2E./admin"),
        ("/app\\admin", "/app\\admin"),
        ("/app/\\/\\/\\admin", "/app/\\/\\/\\admin"),
        ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
        ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc"),
        ("/app//../admin", "/app//../admin"),
        ("/app//../../admin", "/app//../../admin"),
    ],
    N.BASE: [
        ("/", "/"),
        ("/app/", "/app/"),
        ("/app/../admin", "/admin"),
        ("/app", "/app"),
        ("/app//", "/app//"),
        ("/app/%2f", "/app/%2f"),
        ("/app%2f/", "/app%2f/"),
        ("/xyz%30..//abc", "/xyz0..//abc"),
        ("/app/%2E./admin", "/admin"),
        ("/app\\admin", "/app/admin"),
        ("/app/\\/\\/\\admin", "/app//////admin"),
        ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
        ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F..%2fadmin%5c/abc"),
        ("/app//../admin", "/app/admin"),
        ("/app//../../admin", "/admin"),
    ],
    N.MERGE_SLASHES: [
        ("/", "/"),
        ("/app/", "/app/"),
        ("/app/../admin", "/admin"),
        ("/app", "/app"),
        ("/app//", "/app/"),
        ("/app/%2f", "/app/%2f"),
        ("/app%2f/", "/app%2f/"),
        ("/xyz%30..//abc", "/xyz0../abc"),
        ("/app/%2E./admin", "/admin"),
        ("/app\\admin", "/app/admin"),
        ("/app/\\/\\/\\admin", "/app/admin"),
        ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
        ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F..%2fadmin%5c/abc"),
        ("/app//../admin", "/app/admin"),
        ("/app//../../admin", "/admin"),
    ],
    N.DECODE_AND_MERGE_SLASHES: [
        ("/", "/"),
        ("/app/", "/app/"),
        ("/app/../admin", "/admin"),
        ("/app", "/app"),
        ("/app//", "/app/"),
        ("/app/%2f", "/app/"),
        ("/app%2f/", "/app/"),
        ("/xyz%30..//abc", "/xyz0../abc"),
        ("/app/%2E./admin", "/admin"),
        ("/app\\admin", "/app/admin"),
        ("/app/\\/\\/\\admin", "/app/admin"),
        ("/%2Fapp%5cadmin%5Cabc", "/app/admin/abc"),
        ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/app/admin/abc"),
        ("/app//../admin", "/app/admin"),
        ("/app//../../admin", "/admin"),
        ("/%c0%2e%c0%2e/admin", "/%c0.%c0./admin"),
        ("/%c0%2fadmin", "/%c0/admin"),
        # Istio's "NotNormalized" group: left as they are.
        *[
            (p, p)
            for p in (
                "/0x2e0x2e/admin",
                "/0x2e0x2e0x2fadmin",
                "/0x2e0x2e0x5cadmin",
                "/0x2f0x2fadmin",
                "/0x5c0x5cadmin",
                "/%25c0%25ae%25c1%259cadmin",
                "/%25c0%25ae%25c0%25ae/admin",
                "/%25c0%25afadmin",
                "/%25c1%259cadmin",
                "/%252e%252e/admin",
                "/%252e%252e%252fadmin",
                "/%c1%9cadmin",
                "/%c0%ae%c0%ae/admin",
                "/%c0%afadmin",
                "/.../admin",
                "/..../admin",
                "/..;/admin",
                "/;/admin",
                "/admin;a=b",
                "/admin;a=b/xyz",
                "/admin,a=b/xyz",
                "/Admin",
                "/ADMIN",
            )
        ],
    ],
}


@pytest.mark.parametrize(
    ("mode", "raw", "expected"),
    [(mode, raw, out) for mode, cases in ISTIO.items() for raw, out in cases],
)
def test_istio_normalization_reference(mode, raw, expected):
    assert normalize_target(raw, mode).path == expected


def _supported(i: int) -> bool:
    c = chr(i)
    return c.isascii() and (c.isalnum() or c in "-._~/\\")


@pytest.mark.parametrize("i", range(1, 0x100))
def test_istio_percent_encoded_cases(i):
    """Istio's PercentEncoded group (%01 to %ff under DECODE_AND_MERGE_SLASHES)."""
    raw = f"/admin%{i:02x}"
    expected = urllib.parse.unquote(raw).replace("\\", "/") if _supported(i) else raw
    assert normalize_target(raw, N.DECODE_AND_MERGE_SLASHES).path == expected


@pytest.mark.parametrize("mode", list(N))
@pytest.mark.parametrize(
    "raw", ["/admin%00", "/a%zz", "/a%2", "/a#frag", "admin", "ftp://x/admin", "http://u@x/a"]
)
def test_invalid_targets_are_refused(mode, raw):
    with pytest.raises(BadTarget):
        normalize_target(raw, mode)


@pytest.mark.parametrize(
    ("raw", "path", "query", "authority"),
    [
        ("http://cart/admin", "/admin", "", "cart"),
        ("HTTP://cart:7070/x/../admin?q=1", "/admin", "?q=1", "cart:7070"),
        ("https://cart", "/", "", "cart"),
        ("http://cart?x", "/", "?x", "cart"),
        ("/a/./b?c=/../d", "/a/b", "?c=/../d", None),  # the query is not a path
    ],
)
def test_absolute_form_is_split_into_host_and_path(raw, path, query, authority):
    t = normalize_target(raw)
    assert (t.path, t.query, t.authority) == (path, query, authority)


def test_asterisk_form_only_for_options():
    assert normalize_target("*", method="OPTIONS").path == "*"
    with pytest.raises(BadTarget):
        normalize_target("*", method="GET")


@pytest.mark.parametrize(
    "raw", ["/./admin", "/x/../admin", "/%61dmin", "//admin", "/admin/", "/ADMIN/../admin"]
)
def test_the_issues_bypasses_all_become_admin_by_default(raw):
    assert normalize_target(raw).path.rstrip("/") == "/admin"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cart.shop.", "cart.shop"),
        ("Cart.Shop.:80", "cart.shop:80"),
        ("catalog:9080", "catalog:9080"),
        ("[fd00::1]:80", "[fd00::1]:80"),
    ],
)
def test_authorities(raw, expected):
    assert normalize_authority(raw) == expected
