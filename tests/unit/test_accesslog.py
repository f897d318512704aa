"""The access log: the daemons' line format, batching while a flusher runs, level switching."""

from __future__ import annotations

import io
import json
import logging
import re

import trio
from prometheus_client import CollectorRegistry, generate_latest

from veil.runtime.telemetry.accesslog import FLUSH_INTERVAL, AccessLog
from veil.runtime.telemetry.metrics import LABELS, Connection, TcpMetrics

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


async def test_while_a_flusher_runs_lines_are_written_in_batches(autojump_clock):
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


def test_tcp_counters_and_log_lines_keep_their_exposition_and_json():
    """Counters are plain integers exported at scrape time, and the line is built from a
    cached part: both must read exactly as prometheus-client's Counter and json.dumps did."""
    out = io.StringIO()
    registry = CollectorRegistry()
    metrics = TcpMetrics(registry, AccessLog(stream=out))
    denied = Connection(
        "source", "hbone", "10.0.0.1:4000", "10.0.0.2:80", sent=5, received=7,
        response_flags="RBAC", policy="ns/deny-all", error='refused: "x" \u00e9',
    )  # fmt: skip
    logger = logging.getLogger("veil.access")
    old = logger.level
    try:
        logger.setLevel(logging.INFO)
        metrics.record(denied)
        metrics.record(denied)
        metrics.record(Connection("destination", "plaintext", "10.0.0.3:1", "10.0.0.2:80"))
    finally:
        logger.setLevel(old)
    lines = [line.split("veil.access: ", 1)[1] for line in out.getvalue().splitlines()]
    for line in lines:
        assert json.dumps(json.loads(line)) == line
    entry = json.loads(lines[0])
    assert list(entry) == [
        "reporter", "path", "src", "dst", "src_workload", "src_namespace", "src_identity",
        "dst_service", "dst_workload", "dst_namespace", "dst_identity", "bytes_sent",
        "bytes_received", "duration_ms", "decision", "policy", "response_flags", "error",
    ]  # fmt: skip
    assert entry["error"] == 'refused: "x" \u00e9' and entry["policy"] == "ns/deny-all"
    assert json.loads(lines[2])["policy"] is None and json.loads(lines[2])["error"] is None
    labels = dict(zip(LABELS, denied.label_values(), strict=True))
    assert registry.get_sample_value("istio_tcp_connections_opened_total", labels) == 2
    assert registry.get_sample_value("istio_tcp_connections_closed_total", labels) == 2
    assert registry.get_sample_value("istio_tcp_sent_bytes_total", labels) == 10
    assert registry.get_sample_value("istio_tcp_received_bytes_total", labels) == 14
    text = generate_latest(registry).decode()
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
