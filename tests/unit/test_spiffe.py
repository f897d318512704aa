import pytest

from veil.core.spiffe import IdentityError, SpiffeId


def test_round_trip():
    sid = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")
    assert sid == SpiffeId("cluster.local", "shop", "frontend")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.mark.parametrize(
    "uri",
    [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/namespace/a/sa/b",
        "spiffe://Cluster Local/ns/a/sa/b",
        "spiffe://cluster.local/ns/A/sa/b",
        "spiffe://cluster.local/ns//sa/b",
    ],
)
def test_malformed_ids_are_refused(uri):
    with pytest.raises(IdentityError):
        SpiffeId.parse(uri)
