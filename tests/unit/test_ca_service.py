"""The CA's request handling: who may ask for what, every refusal, audit and metrics."""

import datetime
import json
import logging

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.mesh import SHOP_PODS, TD, InProcessCa
from tests.support.pki import csr_with
from veil.ca.auth import write_tokens_file
from veil.core.csr import build_csr, new_key
from veil.core.spiffe import SpiffeId
from veil.core.state import build_state
from veil.runtime.http import Request

FRONTEND = SpiffeId(TD, "shop", "frontend")
CATALOG = SpiffeId(TD, "shop", "catalog")


def body(identity: SpiffeId | str, csr: bytes | None = None, **extra) -> bytes:
    sid = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
    csr = csr if csr is not None else build_csr(new_key(), sid)
    return json.dumps({"identity": str(identity), "csr": csr.decode(), **extra}).encode()


async def test_issues_for_an_identity_on_the_node(ca, caplog):
    caplog.set_level(logging.INFO, "veil.ca.audit")
    status, doc = await ca.post(body(FRONTEND), ca.tokens["node1"])
    assert status == 200, doc
    leaf = x509.load_pem_x509_certificate(doc["certChain"][0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(FRONTEND)]
    assert doc["trustBundle"] == ca.signer.material.bundle_pem()
    (line,) = [json.loads(r.getMessage()) for r in caplog.records]
    assert line["event"] == "issued" and line["node"] == "node1"
    assert line["identity"] == str(FRONTEND)
    assert "BEGIN" not in caplog.text  # no key or certificate material in logs


async def test_ttl_is_honoured(ca):
    status, doc = await ca.post(body(FRONTEND, ttlSeconds=5), ca.tokens["node1"])
    assert status == 200
    leaf = x509.load_pem_x509_certificate(doc["certChain"][0].encode())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(seconds=65)


@pytest.mark.parametrize(
    ("make", "token_of", "status", "code"),
    [
        (lambda: body(CATALOG), "node1", 403, "not_on_node"),
        (lambda: body(SpiffeId(TD, "shop", "retired")), "node1", 403, "not_on_node"),
        (lambda: body(SpiffeId(TD, "shop", "ghost")), "node2", 403, "not_on_node"),
        (lambda: body(FRONTEND), None, 401, "no_credential"),
        (lambda: body(FRONTEND), "forged", 401, "unknown_credential"),
        (lambda: b"\x00garbage", "node1", 400, "bad_request"),
        (lambda: b"[1, 2]", "node1", 400, "bad_request"),
        (lambda: json.dumps({"identity": str(FRONTEND)}).encode(), "node1", 400, "bad_request"),
        (lambda: body(FRONTEND, csr=b"not a csr"), "node1", 400, "bad_csr"),
        (lambda: body(FRONTEND, csr=build_csr(new_key(), CATALOG)), "node1", 400, "san_mismatch"),
        (
            lambda: body(
                FRONTEND,
                csr=csr_with(
                    rsa.generate_private_key(65537, 2048),
                    [x509.UniformResourceIdentifier(str(FRONTEND))],
                ),
            ),
            "node1",
            400,
            "bad_key_type",
        ),
        (lambda: body("spiffe://evil.org/ns/shop/sa/frontend"), "node1", 400, "wrong_trust_domain"),
        (lambda: body(FRONTEND, ttlSeconds="long"), "node1", 400, "bad_request"),
    ],
)
async def test_refusals_are_clear_and_the_ca_keeps_serving(
    ca, caplog, make, token_of, status, code
):
    caplog.set_level(logging.INFO, "veil.ca.audit")
    token = ca.tokens.get(token_of, token_of) if token_of else None
    got, doc = await ca.post(make(), token)
    assert (got, doc["code"]) == (status, code), doc
    assert doc["error"]
    refusal = json.loads(caplog.records[-1].getMessage())
    assert refusal["event"] == "refused" and refusal["code"] == code
    # The CA answers the next good request.
    ok, _ = await ca.post(body(FRONTEND), ca.tokens["node1"])
    assert ok == 200
    metrics = (await ca.service.metrics_handler(Request("GET", "/metrics", {}, b"", ""))).body
    assert f'veil_ca_certificates_refused_total{{code="{code}"}} 1.0'.encode() in metrics
    assert b"veil_ca_certificates_issued_total 1.0" in metrics


async def test_refusal_names_the_node_and_where_the_identity_runs(ca):
    _, doc = await ca.post(body(CATALOG), ca.tokens["node1"])
    assert "node node1 may not obtain spiffe://cluster.local/ns/shop/sa/catalog" in doc["error"]
    assert "runs on node2" in doc["error"]


async def test_expired_bootstrap_credential(ca):
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    write_tokens_file(ca.tokens_file, {"node1": (ca.tokens["node1"], past)})
    status, doc = await ca.post(body(FRONTEND), ca.tokens["node1"])
    assert (status, doc["code"]) == (401, "credential_expired")


async def test_other_endpoints(ca):
    h = ca.service.handle
    bundle = await h(Request("GET", "/v1/trust-bundle", {}, b"", ""))
    assert bundle.status == 200 and b"BEGIN CERTIFICATE" in bundle.body
    assert b"PRIVATE" not in bundle.body
    assert (await h(Request("GET", "/v1/certificates", {}, b"", ""))).status == 405
    assert (await h(Request("GET", "/nope", {}, b"", ""))).status == 404
    assert (await h(Request("GET", "/healthz", {}, b"", ""))).status == 200


async def test_a_lagging_snapshot_gets_a_moment_to_catch_up(tmp_path):
    """An agent may see a new pod before the CA does: the CA waits briefly, then signs."""
    ca = InProcessCa(tmp_path, pods=[])

    async def pod_appears():
        await trio.sleep(0.05)
        ca.state.update(build_state(SHOP_PODS, 2))

    async with trio.open_nursery() as n:
        n.start_soon(pod_appears)
        status, doc = await ca.post(body(FRONTEND), ca.tokens["node1"])
    assert status == 200, doc


async def test_a_workload_credential_obtains_only_its_own_identity(ca):
    """A waypoint pod's credential (the lab's stand-in for its projected token)."""
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    write_tokens_file(
        ca.tokens_file,
        {"node1": (ca.tokens["node1"], soon)},
        [("node1", str(FRONTEND), "pod-token", soon)],
    )
    status, doc = await ca.post(body(FRONTEND), "pod-token")
    assert status == 200, doc
    status, doc = await ca.post(body(CATALOG), "pod-token")
    assert (status, doc["code"]) == (403, "not_this_identity")
    assert f"this credential is for {FRONTEND} only" in doc["error"]


async def test_deeply_nested_json_is_a_bad_request_not_a_crash(ca):
    """Issue 17.8: answered 500 (a RecursionError) before."""
    status, doc = await ca.post(b"[" * 50_000 + b"]" * 50_000, ca.tokens["node1"])
    assert (status, doc["code"]) == (400, "bad_request")


async def test_one_node_is_rate_limited(ca):
    """Issue 17.8: 150 certificates in 15 s from one node were all issued."""
    ca.service.node_rate = (1.0, 3.0)
    got = [(await ca.post(body(FRONTEND), ca.tokens["node1"]))[0] for _ in range(5)]
    assert got[:3] == [200, 200, 200] and 429 in got[3:]
    status, doc = await ca.post(body(CATALOG), ca.tokens["node2"])
    assert status == 200, doc  # other nodes are not held up
