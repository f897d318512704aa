"""h2spec (github.com/summerwind/h2spec, built by `make upstream`) against Veil's HTTP/2 code:
the waypoint's HTTP/2 listener (prior knowledge, reached as an app reaches it: from a mesh
pod, through its agent and an HBONE tunnel) and the agent's HBONE server (15008, through a
TLS client that holds a mesh certificate, since h2spec has none). Every case must pass but
those listed with their reason in docs/waypoint.md and docs/agent.md; a new failure, or a
listed one that starts to pass, fails the test (the lists stay true)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lab import lab_exec, leftovers, new_lab_name, veil
from veil.lab import upstream

WAYPOINT = str(Path(__file__).parents[1] / "integration" / "waypoint")
H2SPEC = upstream.h2spec()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a real lab)"),
    pytest.mark.skipif(H2SPEC is None, reason="h2spec is not built: make upstream"),
]

# The waypoint reads a stream until its protocol is certain: bytes that are not the HTTP/2
# preface are HTTP/1.1 (or TCP), so an invalid preface gets an HTTP/1.1 answer, not a closed
# connection (as any server offering HTTP/1.1 and h2c prior knowledge on one port).
WAYPOINT_EXPECTED_FAILURES = {"http2/3.5 Sends invalid connection preface"}


def failures(report: Path) -> tuple[int, set[str]]:
    """(cases run, `<package> <case>` of each that failed) from h2spec's JUnit report."""
    cases = list(ET.parse(report).getroot().iter("testcase"))
    failed = {
        f"{c.get('package')} {c.get('classname')}"
        for c in cases
        if c.find("error") is not None or c.find("failure") is not None
    }
    return len(cases), failed


@pytest.fixture(scope="module")
def wlab() -> Iterator[str]:
    name = new_lab_name()
    try:
        veil("lab", "up", "-f", WAYPOINT, "--name", name, timeout=300)
        yield name
    finally:
        veil("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []


def test_h2spec_against_the_waypoint(wlab, tmp_path):
    report = tmp_path / "waypoint.xml"
    argv = [str(H2SPEC), "-h", "catalog", "-p", "9080", "-o", "5", "-j", str(report)]
    lab_exec(wlab, "client", *argv, ns="web", check=False)
    run, failed = failures(report)
    assert run >= 145, run  # h2spec 2.2.1: generic, http2 and hpack sections
    assert failed == WAYPOINT_EXPECTED_FAILURES
