"""The certificate manager: prefetch, on-demand, rotation, backoff, and TLS between identities."""

import datetime
import ssl
import time

import pytest
import trio
import trio.testing

from tests.support.mesh import CATALOG, FRONTEND, TD, InProcessCa, handshake, run_manager
from tests.support.waiting import until
from veil.ca.signer import Signer, generate_root
from veil.core.certs import pem
from veil.core.csr import build_csr, new_key
from veil.core.spiffe import IdentityError
from veil.runtime.identity.manager import Backoff, NoCertificate, check_answer
from veil.runtime.identity.tls import PeerIdentityError


def test_backoff_doubles_to_150s_and_resets():
    b = Backoff()
    delays = [b.next() for _ in range(12)]
    assert delays[:5] == [0.5, 1, 2, 4, 8]
    assert delays[-1] == 150 and max(delays) == 150
    b.reset()
    assert b.next() == 0.5


async def test_prefetch_and_mutual_tls_between_identities(ca):
    async with trio.open_nursery() as n:
        node1 = await run_manager(n, ca.fetcher("node1"))
        node2 = await run_manager(n, ca.fetcher("node2"))
        node1.set_identities([FRONTEND])
        node2.set_identities([CATALOG, FRONTEND])
        client = await node1.get(FRONTEND)
        server = await node2.get(CATALOG)
        assert await handshake(server, client, {CATALOG}) == (CATALOG, FRONTEND)
        with pytest.raises(PeerIdentityError, match="not the expected"):
            await handshake(server, client, {FRONTEND})
        meta = node2.snapshot()
        assert {m["identity"] for m in meta} == {str(CATALOG), str(FRONTEND)}
        assert all(m["state"] == "valid" for m in meta)
        # no key material and no key field (the certificates' base64 may spell anything)
        assert "PRIVATE KEY-----" not in repr(meta)
        assert not any("key" in field.lower() for m in meta for field in m)
        assert all(m["certChain"][0].startswith("-----BEGIN CERTIFICATE") for m in meta)
        n.cancel_scope.cancel()


async def test_certificate_from_another_ca_fails_the_handshake(ca, tmp_path):
    other = InProcessCa(tmp_path / "other")
    (tmp_path / "other").mkdir(exist_ok=True)
    async with trio.open_nursery() as n:
        ours = await run_manager(n, ca.fetcher("node1"))
        theirs = await run_manager(n, other.fetcher("node1"))
        good = await ours.get(FRONTEND)
        foreign = await theirs.get(FRONTEND)
        for server, client in ((good, foreign), (foreign, good)):
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
                await handshake(server, client, {FRONTEND})
        n.cancel_scope.cancel()


async def test_the_node_cannot_get_an_identity_it_does_not_run(ca):
    async with trio.open_nursery() as n:
        node1 = await run_manager(n, ca.fetcher("node1"))
        with pytest.raises(NoCertificate, match="403"):
            await node1.get(CATALOG, timeout=2)
        n.cancel_scope.cancel()


async def test_rotation_under_a_short_ttl_keeps_handshakes_working(tmp_path):
    ca = InProcessCa(tmp_path, ttl=datetime.timedelta(seconds=2))
    ca.signer.max_ttl = datetime.timedelta(seconds=2)
    # Leaves are back-dated one minute for clock skew; the TTL counts from now.
    async with trio.open_nursery() as n:
        node1 = await run_manager(n, ca.fetcher("node1"))
        node2 = await run_manager(n, ca.fetcher("node2"))
        serials = set()
        with trio.fail_after(15):
            for _ in range(20):  # ~5 s: more than two lifetimes
                client = await node1.get(FRONTEND)
                server = await node2.get(CATALOG)
                serials.add(client.leaf.serial_number)
                assert await handshake(server, client, {CATALOG}) == (CATALOG, FRONTEND)
                await trio.sleep(0.25)
        assert len(serials) >= 3  # refreshed at half life, again and again
        n.cancel_scope.cancel()


async def test_failures_back_off_and_keep_the_old_certificate(tmp_path):
    ca = InProcessCa(tmp_path, ttl=datetime.timedelta(seconds=4))
    ca.signer.max_ttl = datetime.timedelta(seconds=4)
    async with trio.open_nursery() as n:
        mgr = await run_manager(n, ca.fetcher("node1"))
        first = await mgr.get(FRONTEND)
        ca.fail_next = 2  # the refresh at half life (2 s) fails twice: retries at +0.5 s, +1 s
        await until(lambda: "lastError" in mgr.snapshot()[0], 5)
        assert mgr.current(FRONTEND) is first  # still served while refresh fails
        assert "unreachable" in mgr.snapshot()[0]["lastError"]
        await until(lambda: mgr.current(FRONTEND) is not first, 10)
        cred = mgr.current(FRONTEND)
        assert cred is not None  # the old one was served until the new one arrived
        assert cred.leaf.serial_number != first.leaf.serial_number
        n.cancel_scope.cancel()


async def test_an_expired_certificate_is_never_served(ca):
    offset = [0.0]
    async with trio.open_nursery() as n:
        mgr = await run_manager(n, ca.fetcher("node1"), clock=lambda: time.time() + offset[0])
        cred = await mgr.get(FRONTEND)
        offset[0] = cred.not_after - time.time() + 1
        assert mgr.current(FRONTEND) is None
        n.cancel_scope.cancel()


async def test_removed_identities_are_forgotten(ca):
    async with trio.open_nursery() as n:
        mgr = await run_manager(n, ca.fetcher("node2"))
        mgr.set_identities([FRONTEND, CATALOG])
        await mgr.get(CATALOG)
        mgr.set_identities([FRONTEND])
        assert mgr.current(CATALOG) is None
        assert [m["identity"] for m in mgr.snapshot()] == [str(FRONTEND)]
        n.cancel_scope.cancel()


def test_answers_are_verified_before_use():
    root = generate_root(TD)
    signer = Signer(root, TD)
    key = new_key()
    issued = signer.sign(signer.check_csr(build_csr(key, FRONTEND), FRONTEND), FRONTEND)
    good = {"certChain": [pem(c) for c in issued.chain], "trustBundle": [pem(root.cert)]}
    assert (
        check_answer(
            FRONTEND, key, good, 0.0 + issued.leaf.not_valid_before_utc.timestamp() + 120
        ).identity
        == FRONTEND
    )
    now = issued.leaf.not_valid_before_utc.timestamp() + 120
    with pytest.raises(IdentityError, match="not spiffe"):
        check_answer(CATALOG, key, good, now)
    with pytest.raises(IdentityError, match="another key"):
        check_answer(FRONTEND, new_key(), good, now)
    other_root = generate_root(TD)
    with pytest.raises(IdentityError, match="does not verify"):
        check_answer(FRONTEND, key, {**good, "trustBundle": [pem(other_root.cert)]}, now)
    with pytest.raises(IdentityError, match="malformed"):
        check_answer(FRONTEND, key, {"certChain": "x"}, now)


async def test_a_clock_jump_past_the_renewal_time_renews_within_the_wall_check(ca, autojump_clock):
    """trio sleeps on the monotonic clock: a node whose wall clock steps forward (NTP, a VM
    resumed) past the renewal time must renew within WALL_CHECK, not sleep out the half
    life it planned (with 24 h certificates: 12 h with a certificate peers see as stale)."""
    from veil.runtime.identity.manager import WALL_CHECK  # noqa: PLC0415

    offset = [0.0]
    async with trio.open_nursery() as n:
        mgr = await run_manager(n, ca.fetcher("node1"), clock=lambda: time.time() + offset[0])
        mgr.set_identities([FRONTEND])
        first = await mgr.get(FRONTEND)
        offset[0] = (first.not_after - time.time()) * 0.75  # past refresh_at, not expired
        started = trio.current_time()
        with trio.fail_after(WALL_CHECK + 5):  # (virtual time: the autojump clock)
            while mgr.current(FRONTEND) is first:
                await trio.sleep(0.5)
        assert trio.current_time() - started <= WALL_CHECK + 1
        n.cancel_scope.cancel()


async def test_failing_renewals_are_said_until_one_works(tmp_path):
    ca = InProcessCa(tmp_path)
    async with trio.open_nursery() as n:
        mgr = await run_manager(n, ca.fetcher("node2"))
        mgr.set_identities([CATALOG])
        await mgr.get(CATALOG)
        assert mgr.failing() == {}
        ca.fail_next = 1
        mgr.set_identities([])
        mgr.set_identities([CATALOG])  # fetched again: fails once
        await until(lambda: CATALOG in mgr.failing(), 5)
        assert "unreachable" in mgr.failing()[CATALOG]
        await until(lambda: mgr.failing() == {}, 5)  # the retry (0.5 s later) worked
        n.cancel_scope.cancel()
