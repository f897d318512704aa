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
from tests.support.waypoint import DEST, Pipe, feed, service_policy, waypoint, with_state
from veil.waypoint.pipeline import Caller


async def http1_status(wp: Any, wire: bytes) -> int:
    pipe = Pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, pipe, wire)
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))
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
        nursery.start_soon(feed, pipe, client.data_to_send())
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))
    for ev in client.receive_data(bytes(pipe.out)):
        if isinstance(ev, h2.events.ResponseReceived):
            return int(dict(ev.headers)[b":status"])
    return 0


ADMIN_SPELLINGS = ["/admin", "/./admin", "/x/../admin", "/%61dmin", "//admin", "/admin/../admin"]


@pytest.mark.parametrize("path", ADMIN_SPELLINGS)
async def test_a_deny_on_a_path_holds_for_every_spelling_in_both_protocols(tmp_path, path):
    """Issue 17.11."""
    wp = waypoint(tmp_path)
    with_state(wp, service_policy("no-admin", "DENY", {"paths": ["/admin*"]}))
    wire = f"GET {path} HTTP/1.1\r\nHost: catalog\r\n\r\n".encode()
    assert await http1_status(wp, wire) == 403
    assert await http2_status(wp, path) == 403


async def test_absolute_form_is_judged_by_its_path_and_host(tmp_path):
    wp = waypoint(tmp_path)
    with_state(wp, service_policy("no-admin", "DENY", {"paths": ["/admin*"]}))
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
    with_state(wp, service_policy("no-host", "DENY", {"hosts": rule}))
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
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))  # type: ignore[arg-type]
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(pipe.out))]
    assert statuses[-1] == 400
    assert pipe.sent_eof or pipe.reset_code is not None


# -- which destinations the waypoint serves (issue 17.14) ----------------------------------------


def cluster(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    """shop (its Services use waypoint `waypoint`) and other (no waypoint)."""

    def ns(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}

    def svc(ns: str, name: str, vip: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "labels": labels or {}},
            "spec": {"clusterIP": vip, "ports": [{"port": 80}], "selector": {"app": name}},
        }

    def pod(ns: str, name: str, app: str, ip: str) -> dict[str, Any]:
        return {
            "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
            "spec": {"nodeName": "node1"},
            "status": {"podIP": ip, "phase": "Running"},
        }

    return [
        ns("shop", {"veil.dev/use-waypoint": "waypoint"}),
        ns("other", {}),
        {
            "kind": "Gateway",
            "metadata": {"namespace": "shop", "name": "waypoint"},
            "spec": {"gatewayClassName": "veil-waypoint"},
        },
        svc("shop", "cart", "10.96.0.7"),
        svc("shop", "legacy", "10.96.0.8", {"veil.dev/use-waypoint": "none"}),
        svc("other", "db", "10.96.0.9"),
        pod("shop", "cart-1", "cart", "10.244.1.7"),
        pod("shop", "legacy-1", "legacy", "10.244.1.8"),
        pod("other", "db-1", "db", "10.244.2.9"),
        *extra,
    ]


@pytest.mark.parametrize(
    ("target", "served"),
    [
        (("10.96.0.7", 80), True),  # shop/cart's VIP: its Service uses this waypoint
        (("10.244.1.7", 80), True),  # a cart pod: bound through its Service
        (("10.96.0.8", 80), False),  # a Service that opted out
        (("10.244.1.8", 80), False),  # ... and its pod
        (("10.96.0.9", 80), False),  # another namespace's Service
        (("10.244.2.9", 80), False),  # another namespace's pod
        (("10.0.0.1", 80), False),  # nothing known
    ],
)
def test_the_waypoint_takes_connects_only_for_what_it_serves(tmp_path, target, served):
    wp = waypoint(tmp_path)
    with_state(wp, *cluster())
    dest = wp.destination(wp.store.current, target)
    assert isinstance(dest, str) is not served, dest


async def test_a_pod_addressed_by_ip_is_judged_by_its_services_policies(tmp_path):
    """POST to cart's pod IP got 200 where the Service-targeted policy denies POST."""
    wp = waypoint(tmp_path)
    no_post = service_policy("cart-no-post", "DENY", {"methods": ["POST"]}, service="cart")
    with_state(wp, *cluster(no_post))
    for target in (("10.96.0.7", 80), ("10.244.1.7", 80)):
        dest = wp.destination(wp.store.current, target)
        assert not isinstance(dest, str)
        pipe = Pipe()
        wire = b"POST / HTTP/1.1\r\nHost: cart\r\nContent-Length: 0\r\n\r\n"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed, pipe, wire)
            with trio.fail_after(5):
                await wp.serve_stream(pipe, dest, Caller(FRONTEND, "10.244.1.5"))  # type: ignore[arg-type]
        assert bytes(pipe.out).startswith(b"HTTP/1.1 403 "), target


async def test_a_default_deny_on_the_gateway_class_holds_at_every_waypoint(tmp_path):
    """Issue 17.17: a root-namespace policy targeting GatewayClass veil-waypoint."""
    wp = waypoint(tmp_path)
    deny_all = {
        "apiVersion": "security.veil.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "veil-system", "name": "default-deny"},
        "spec": {"targetRefs": [{"kind": "GatewayClass", "name": "veil-waypoint"}]},
    }
    with_state(wp, *cluster(deny_all))
    dest = wp.destination(wp.store.current, ("10.96.0.7", 80))
    assert not isinstance(dest, str)
    assert await http1_status(wp, b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n") == 403
    assert wp.authorize_tcp(dest, Caller(FRONTEND, "10.244.1.5")) is not None
    assert wp.store.current.policies.errors == {}


TEMPLATE_SPELLINGS = [
    "/admin/users/1",
    "/./admin/users/1",
    "/x/../admin/users/1",
    "/%61dmin/users/1",
    "//admin//users/1",
    "/admin/users/1?x=/y",
    "http://catalog/admin/users/1",  # absolute form
]


@pytest.mark.parametrize("path", TEMPLATE_SPELLINGS)
async def test_a_deny_on_a_path_template_holds_for_every_spelling(tmp_path, path):
    """Istio path templates (issue 22) are judged on the normalized path, in both protocols:
    split packets, encoded and dot-segment spellings, absolute form."""
    wp = waypoint(tmp_path)
    with_state(wp, service_policy("no-admin", "DENY", {"paths": ["/admin/{*}/{**}"]}))
    wire = f"GET {path} HTTP/1.1\r\nHost: catalog\r\n\r\n".encode()
    assert await http1_status(wp, wire) == 403
    half = len(wire) // 2
    pipe = Pipe()
    async with trio.open_nursery() as nursery:  # the same request in two pieces
        nursery.start_soon(feed, pipe, wire[:half], wire[half:])
        with trio.fail_after(5):
            await wp.serve_stream(pipe, DEST, Caller(FRONTEND, "10.244.1.5"))  # type: ignore[arg-type]
    assert bytes(pipe.out).startswith(b"HTTP/1.1 403 ")
    if not path.startswith("http://"):
        assert await http2_status(wp, path) == 403


async def test_an_odd_method_does_not_escape_a_path_template_deny(tmp_path):
    wp = waypoint(tmp_path)
    with_state(wp, service_policy("no-admin", "DENY", {"paths": ["/admin/{**}"]}))
    for method in ("PROPFIND", "get", "X-CUSTOM"):
        wire = f"{method} /admin/a HTTP/1.1\r\nHost: catalog\r\n\r\n".encode()
        assert await http1_status(wp, wire) in (400, 403), method
