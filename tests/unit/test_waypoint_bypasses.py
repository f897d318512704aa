"""Issue 17's policy bypasses at the waypoint, as conversations: the same request in every
spelling, over HTTP/1.1 and HTTP/2, must get the same verdict (no sockets, no lab)."""

from __future__ import annotations

import re
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from tests.support.hbone import FRONTEND
from tests.support.waypoint import DEST, Pipe, feed, waypoint, with_state


def policy(name: str, action: str, operation: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "catalog"}],
            "action": action,
            "rules": [{"to": [{"operation": operation}]}],
        },
    }


async def http1_status(wp: Any, wire: bytes) -> int:
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, pipe, wire)
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, FRONTEND, "10.244.1.5")
    head = bytes(pipe.out).split(b"\r\n", 1)[0]
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0


async def http2_status(wp: Any, path: str, authority: str = "catalog") -> int:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1,
        [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)],
        end_stream=True,
    )
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: feed(pipe, client.data_to_send(), pause=0.3))
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, FRONTEND, "10.244.1.5")
    for ev in client.receive_data(bytes(pipe.out)):
        if isinstance(ev, h2.events.ResponseReceived):
            return int(dict(ev.headers)[b":status"])
    return 0


ADMIN_SPELLINGS = ["/admin", "/./admin", "/x/../admin", "/%61dmin", "//admin", "/admin/../admin"]


@pytest.mark.parametrize("path", ADMIN_SPELLINGS)
async def test_a_deny_on_a_path_holds_for_every_spelling_in_both_protocols(tmp_path, path):
    """Issue 17.11."""
    wp = waypoint(tmp_path)
    with_state(wp, policy("no-admin", "DENY", {"paths": ["/admin*"]}))
    wire = f"GET {path} HTTP/1.1\r\nHost: catalog\r\n\r\n".encode()
    assert await http1_status(wp, wire) == 403
    assert await http2_status(wp, path) == 403


async def test_absolute_form_is_judged_by_its_path_and_host(tmp_path):
    wp = waypoint(tmp_path)
    with_state(wp, policy("no-admin", "DENY", {"paths": ["/admin*"]}))
    wire = b"GET http://catalog/admin HTTP/1.1\r\nHost: elsewhere\r\n\r\n"
    assert await http1_status(wp, wire) == 403


@pytest.mark.parametrize("path", ["/a%zz", "/admin%00", "/a#b"])
async def test_targets_without_one_meaning_get_400(tmp_path, path):
    wp = waypoint(tmp_path)
    with_state(wp)
    assert await http1_status(wp, f"GET {path} HTTP/1.1\r\nHost: c\r\n\r\n".encode()) == 400


@pytest.mark.parametrize(
    ("rule", "host", "denied"),
    [
        (["catalog:9080"], "catalog:9080", True),  # was: never matched
        (["catalog"], "catalog:9080", False),  # Istio: the port is part of the authority
        (["catalog*"], "catalog:9080", True),
        (["cart.shop"], "cart.shop.", True),  # a trailing dot no longer slips past
        (["cart.shop:80"], "CART.SHOP.:80", True),
        (["cart.shop"], "cart.shop.evil", False),
    ],
)
async def test_hosts_match_the_authority_as_istio_does(tmp_path, rule, host, denied):
    """Issue 17.12."""
    wp = waypoint(tmp_path)
    with_state(wp, policy("no-host", "DENY", {"hosts": rule}))
    wire = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    assert (await http1_status(wp, wire) == 403) is denied
    assert (await http2_status(wp, "/", host) == 403) is denied


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding:\tchunked\r\n x\r\n\r\n",  # folded
        b"POST / HTTP/1.1\nHost: c\nContent-Length: 4\n\n",  # bare LF
        b"POST / HTTP/1.1\r\nHost: c\rContent-Length: 4\r\n\r\n",  # bare CR
        b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length : 4\r\n\r\n",  # space in the name
        # The second, pipelined request carries the ambiguity.
        b"GET / HTTP/1.1\r\nHost: c\r\n\r\n"
        b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
async def test_ambiguous_framing_is_refused_with_400_and_the_stream_ends(tmp_path, head):
    """Issue 17.13: request smuggling."""
    wp = waypoint(tmp_path)
    with_state(wp)
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, pipe, head + b"0\r\n\r\n")
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, FRONTEND, "10.244.1.5")
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(pipe.out))]
    assert statuses[-1] == 400
    assert pipe.sent_eof or pipe.reset_code is not None
