"""The access log: the daemons' line format, batching while a flusher runs, level switching."""

from __future__ import annotations

import io
import json
import logging
import re

import trio
from prometheus_client import CollectorRegistry

from agent.telemetry.accesslog import FLUSH_INTERVAL, AccessLog
from agent.telemetry.metrics import Connection, TcpMetrics

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO veil\.access: (\{.*\})$")


def test_lines_look_like_the_daemons_log_lines_and_parse_as_json():
    out = io.StringIO()
    log = AccessLog(stream=out)
    log.write({"reporter": "source", "bytes_sent": 5})
    [line] = out.getvalue().splitlines()
    m = LINE.match(line)
    assert m is not None, line
    assert json.loads(m.group(1)) == {"reporter": "source", "bytes_sent": 5}
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("veil.access", logging.INFO, "", 0, "{}", None, None)
    assert LINE.match(formatter.format(record))  # the same shape as logging's own


async def test_while_a_flusher_runs_lines_are_written_in_batches():
    out = io.StringIO()
    log = AccessLog(stream=out)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(3):
            log.write({"n": i})
        assert out.getvalue() == ""
        await trio.sleep(FLUSH_INTERVAL * 2)
        assert len(out.getvalue().splitlines()) == 3
        log.write({"n": 3})
        nursery.cancel_scope.cancel()
    assert len(out.getvalue().splitlines()) == 4  # the rest is written when it stops


def test_tcp_connections_are_logged_unless_the_level_says_otherwise():
    out = io.StringIO()
    metrics = TcpMetrics(CollectorRegistry(), AccessLog(stream=out))
    c = Connection("source", "hbone", "10.0.0.1:4000", "10.0.0.2:80", response_flags="RBAC")
    logger = logging.getLogger("veil.access")
    old = logger.level
    try:
        logger.setLevel(logging.INFO)
        metrics.record(c)
        entry = json.loads(out.getvalue().split("veil.access: ", 1)[1])
        assert entry["decision"] == "deny" and entry["dst_service"] == "10.0.0.2"
        logger.setLevel(logging.WARNING)
        metrics.record(c)
    finally:
        logger.setLevel(old)
    assert len(out.getvalue().splitlines()) == 1
