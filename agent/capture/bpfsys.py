"""The two bpf(2) commands bcc's Python API lacks: BPF_PROG_QUERY (which programs a cgroup
has, for status and tests) and BPF_PROG_TEST_RUN (run a tc program on a packet, for tests)."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
BPF_PROG_QUERY = 16
ATTR_SIZE = 128
SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff)
SKB_MARK_OFFSET = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.syscall(SYS_BPF, cmd, attr, ATTR_SIZE) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def attached(cgroup_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup for one hook (not inherited ones)."""
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, cgroup_fd, attach_type, 0, 0)
    struct.pack_into("=QI", attr, 16, ctypes.addressof(ids), 64)
    _bpf(BPF_PROG_QUERY, attr)
    count = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[:count])


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    mark: int


def test_run(prog_fd: int, packet: bytes, mark: int = 0) -> TestRun:
    """Run a tc (sched_cls) program once on `packet` (Ethernet frame) in the caller's netns."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx_in = ctypes.create_string_buffer(SKB_CTX_SIZE)
    ctx_out = ctypes.create_string_buffer(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx_in, SKB_MARK_OFFSET, mark)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, prog_fd, 0, len(packet), len(data_out))
    struct.pack_into("=QQII", attr, 16, _addr(data_in), _addr(data_out), 1, 0)
    struct.pack_into("=IIQQ", attr, 40, SKB_CTX_SIZE, SKB_CTX_SIZE, _addr(ctx_in), _addr(ctx_out))
    _bpf(BPF_PROG_TEST_RUN, attr)
    retval, _, size_out = struct.unpack_from("=III", attr, 4)
    return TestRun(
        retval=retval,
        data=data_out.raw[:size_out],
        mark=struct.unpack_from("=I", ctx_out, SKB_MARK_OFFSET)[0],
    )
