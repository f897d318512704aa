"""The C programs themselves: tc programs run on crafted packets with BPF_PROG_TEST_RUN inside
a scratch netns (real kernel, real verifier, real socket lookups), and the error paths of
loading them. The lab behaviour of eBPF mode is tested by the L4 suite (both modes)."""

from __future__ import annotations

import secrets
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from veil.agent.capture import bpfsys, ebpf
from veil.agent.capture.base import CaptureError, CaptureTarget
from veil.agent.capture.netns import NetNs

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
POD, CLIENT, PROBE = "10.9.0.2", "10.9.0.7", "169.254.7.127"
SYN, ACK = 0x02, 0x10


def frame(src: str, dst: str, sport: int, dport: int, flags: int, proto: int = 6) -> bytes:
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        0,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return eth + ip + l4


@pytest.fixture(scope="module")
def progs() -> Iterator[ebpf.EbpfCapture]:
    pin = ebpf.BPFFS / f"veil-test-{secrets.token_hex(3)}"
    cap = ebpf.EbpfCapture(pin_dir=pin)
    try:
        cap.load()
        yield cap
    finally:
        cap.close()
        shutil.rmtree(pin, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[NetNs]:
    name = f"veil-tprog-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{POD}/32", "dev", "lo"], check=True)
        ns = NetNs(f"/run/netns/{name}")
        try:
            yield ns
        finally:
            ns.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(cap: ebpf.EbpfCapture, ns: NetNs, hook: str, packet: bytes, mark: int = 0):
    with ns.entered():
        return bpfsys.test_run(cap.program_fd(hook), packet, mark)


def counter(cap: ebpf.EbpfCapture, name: str) -> int:
    return cap.counters()[name]


def test_ingress_finds_the_15006_listener_for_a_new_connection(progs, scratch):
    """BPF_PROG_TEST_RUN is not tc ingress, so bpf_sk_assign refuses (EOPNOTSUPP) and the
    program drops, counting `assign_failed` rather than `no_listener`: the lookup found the
    agent's listener. The real assignment is covered on the lab (`steered` counter)."""
    with scratch.socket(mark=False) as listener:
        listener.bind(("0.0.0.0", 15006))
        listener.listen()
        before = (counter(progs, "assign_failed"), counter(progs, "no_listener"))
        r = run(progs, scratch, "tc_ingress", frame(CLIENT, POD, 40000, 8080, SYN))
        assert r.retval == TC_ACT_SHOT
        after = (counter(progs, "assign_failed"), counter(progs, "no_listener"))
        assert after == (before[0] + 1, before[1])


def test_ingress_drops_a_new_connection_when_no_agent_listens(progs, scratch):
    before = counter(progs, "no_listener")
    r = run(progs, scratch, "tc_ingress", frame(CLIENT, POD, 40000, 8080, SYN))
    assert r.retval == TC_ACT_SHOT  # fail closed: never to the app unauthenticated
    assert counter(progs, "no_listener") == before + 1


@pytest.mark.parametrize(
    "packet",
    [
        frame(CLIENT, POD, 40000, 15008, SYN),  # HBONE
        frame(PROBE, POD, 40000, 8080, SYN),  # kubelet probe
        frame(CLIENT, POD, 40000, 8080, ACK),  # an established connection
        frame(CLIENT, POD, 40000, 8080, SYN, proto=17),  # UDP
        frame(CLIENT, POD, 40000, 8080, SYN)[:40],  # truncated TCP header
    ],
    ids=["hbone", "probe", "established", "udp", "truncated"],
)
def test_ingress_leaves_alone_what_iptables_mode_leaves_alone(progs, scratch, packet):
    steered, dropped = counter(progs, "steered"), counter(progs, "no_listener")
    assert run(progs, scratch, "tc_ingress", packet).retval == TC_ACT_OK
    assert (counter(progs, "steered"), counter(progs, "no_listener")) == (steered, dropped)


def frame6(next_header: int) -> bytes:
    """An Ethernet frame with an IPv6 header (fd00::7 -> fd00::2) and a TCP SYN or whatever
    `next_header` says."""
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x86\xdd"
    l4 = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 0, 5 << 4, SYN, 65535, 0, 0)
    ip6 = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(l4),
        next_header,
        64,
        socket.inet_pton(socket.AF_INET6, "fd00::7"),
        socket.inet_pton(socket.AF_INET6, "fd00::2"),
    )
    return eth + ip6 + l4


def test_ingress_drops_ipv6_tcp_and_nothing_else_of_ipv6(progs, scratch):
    """IPv6 is not captured: its TCP must not reach the app in clear (iptables mode rejects
    it too); ICMPv6 (neighbour discovery) and UDP pass."""
    assert run(progs, scratch, "tc_ingress", frame6(6)).retval == TC_ACT_SHOT
    assert run(progs, scratch, "tc_ingress", frame6(58)).retval == TC_ACT_OK
    assert run(progs, scratch, "tc_ingress", frame6(17)).retval == TC_ACT_OK


def test_egress_hands_replies_of_spoofed_connections_to_lo(progs, scratch):
    with scratch.socket(mark=False) as server, scratch.socket(mark=False) as client:
        server.setblocking(True)
        client.setblocking(True)
        server.bind((POD, 0))
        server.listen()
        client.connect(server.getsockname())
        cport = client.getsockname()[1]
        sport = server.getsockname()[1]
        # The app's reply travels server -> client: a local socket (the "agent") owns it.
        r = run(progs, scratch, "tc_egress", frame(POD, POD, sport, cport, ACK))
        assert r.retval == TC_ACT_REDIRECT
        assert r.mark & 0xFFF == 0x111
        assert r.data[:6] == b"\x00" * 6  # lo's address, or lo would drop it as not ours
        # The agent's own packets, and packets nobody here owns, go out as they are.
        assert (
            run(progs, scratch, "tc_egress", frame(POD, POD, sport, cport, ACK), 0x539).retval == 0
        )
        assert run(progs, scratch, "tc_egress", frame(POD, CLIENT, sport, 1, ACK)).retval == 0


def test_a_verifier_rejection_names_the_program_and_the_reason(tmp_path):
    broken = tmp_path / "ebpf"
    shutil.copytree(ebpf.EBPF_DIR, broken)
    src = (broken / "tc_egress.c").read_text()
    # Read a packet byte without the bounds check the verifier insists on.
    src = src.replace(
        "    if ((skb->mark",
        "    if (*(__u8 *)(long)skb->data == 1)\n        return 1;\n    if ((skb->mark",
        1,
    )
    (broken / "tc_egress.c").write_text(src)
    cap = ebpf.EbpfCapture(pin_dir=ebpf.BPFFS / f"veil-test-{secrets.token_hex(3)}")
    try:
        with pytest.raises(CaptureError, match=r"refused eBPF program veil_tc_egress.*pkt"):
            cap.load(ebpf_dir=broken)
    finally:
        cap.close()
        shutil.rmtree(cap.pin_dir, ignore_errors=True)


def test_missing_kernel_headers_and_btf_are_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(ebpf, "headers_dir", lambda: tmp_path / "no-headers")
    with pytest.raises(CaptureError, match=r"kernel headers.*make setup"):
        ebpf.preflight()
    monkeypatch.setattr(ebpf, "BTF", tmp_path / "no-btf")
    with pytest.raises(CaptureError, match=r"BTF.*CONFIG_DEBUG_INFO_BTF"):
        ebpf.preflight()


def test_a_pod_without_a_cgroup_is_not_captured(progs, scratch):
    target = CaptureTarget(str(scratch.path), "", POD)
    with pytest.raises(CaptureError, match="cgroup"):
        progs.install(target)
    assert not Path(f"{progs.pin_dir}/pods").exists() or not len(progs._bpf[b"veil_pods"])
