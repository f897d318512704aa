"""The port and mark contract has one source (core/ports.py); the eBPF programs'
header repeats it for C, and this test keeps the two in step (issue 18, item 2)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

from veil.core import ports

HEADER = Path(__file__).parents[2] / "ebpf" / "include" / "veil.h"


def defines() -> dict[str, int]:
    found = re.findall(
        r"^#define (VEIL_[A-Z0-9_]+) (0x[0-9a-fA-F]+|\d+)\b", HEADER.read_text(), re.M
    )
    return {name: int(value, 0) for name, value in found}


def test_the_ebpf_header_agrees_with_the_python_contract():
    d = defines()
    assert d["VEIL_OUTBOUND_PORT"] == ports.OUTBOUND_PORT
    assert d["VEIL_INBOUND_PLAIN_PORT"] == ports.INBOUND_PLAIN_PORT
    assert d["VEIL_HBONE_PORT"] == ports.HBONE_PORT
    assert d["VEIL_AGENT_MARK"] == ports.AGENT_MARK
    assert d["VEIL_CONN_MARK"] == ports.CONN_MARK
    assert d["VEIL_MARK_MASK"] == ports.MARK_MASK
    assert d["VEIL_PROBE_SOURCE"] == int(ipaddress.IPv4Address(ports.PROBE_SOURCE))
    assert d["VEIL_LOOPBACK"] == int(ipaddress.IPv4Address("127.0.0.1"))
    assert d["VEIL_SO_ORIGINAL_DST"] == 80  # linux/netfilter_ipv4.h
    assert d["VEIL_SOCK_STREAM"] == socket.SOCK_STREAM
