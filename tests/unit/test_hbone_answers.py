"""A CONNECT that gets no answer: reset with the reason when the peer is silent (a partition,
a node gone), left alone when the peer is alive and only holds its answer (our servers hold
the 200 for the app's first bytes). Real TLS over a socketpair."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.support.hbone import hbone_pair
from veil.runtime.hbone import io as hbone_io
from veil.runtime.hbone.io import HboneError


async def test_a_silent_peer_fails_the_connect_with_the_reason_and_the_tunnel_is_retired(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hbone_io, "ANSWER_TIMEOUT", 2.0)
    client, _server = await hbone_pair(tmp_path, nursery, None, run_server=False)
    stream = await client.open_stream("10.0.0.9:8080", [], wait_response=False)
    await stream.send(b"GET / HTTP/1.1\r\n\r\n")
    with trio.fail_after(4):
        with pytest.raises(HboneError, match=r"no answer to CONNECT from server within 2s"):
            await stream.response()
    assert stream.error is not None and stream.reset_code is not None
    assert client.going_away and not client.conn.can_open_stream()  # the next one dials


async def test_a_peer_that_holds_its_answer_but_answers_pings_is_waited_for(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hbone_io, "ANSWER_TIMEOUT", 1.0)
    held: list[int] = []
    client, server = await hbone_pair(tmp_path, nursery, lambda ev, io: held.append(ev.stream_id))
    stream = await client.open_stream("10.0.0.9:8080", [], wait_response=False)
    client.queue_output()
    await trio.sleep(3.5)  # three checks: each PING answered, so the peer is there
    assert stream.reset_code is None and not client.going_away and held
    server.conn.respond(held[0], 200)
    server.queue_output()
    with trio.fail_after(2):
        assert await stream.response() == 200
