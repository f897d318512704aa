"""eBPF capture mode: the programs in ebpf/, compiled by bcc at agent start, attached per pod.

Per enrolled pod: cgroup/connect4 and connect6 (dual-stack sockets reaching IPv4 through
v4-mapped addresses), cgroup/getpeername4/6 and getsockname4/6, and sockops on the pod's cgroup
v2 group (outbound connects go to 15001, the original destination is recorded; the app reads
back its destination as its peer and the pod's IP as its own address, as with NAT), tc ingress
and egress on the pod's eth0 (inbound plaintext to 15006 with bpf_sk_assign; the app's replies
to spoofed connections are handed to lo, where the same policy routing as iptables mode
delivers them to the agent). Once per agent: cgroup/getsockopt on the agent's own cgroup
answers SO_ORIGINAL_DST from the maps, so the proxy code is the same in both modes.

Cgroup programs are attached without BPF_F_ALLOW_MULTI: attaching again replaces the previous
program atomically, which is how a restarted agent takes over its predecessor's pods without a
gap. Maps are pinned under the pin directory for the same reason. While no agent runs, the
programs stay attached and redirect to listeners that are gone: connections are refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.agent.capture import cgroup2, iptables
from veil.agent.capture.base import CaptureError, CaptureTarget
from veil.agent.capture.netns import NetNs, NetnsError

log = logging.getLogger("veil.capture.ebpf")

EBPF_DIR = Path(os.environ.get("VEIL_EBPF_DIR") or Path(__file__).resolve().parents[2] / "ebpf")
HOOKS = (
    "connect4.c",
    "connect6.c",
    "names.c",
    "sockops.c",
    "getsockopt.c",
    "tc_ingress.c",
    "tc_egress.c",
)
INCLUDE = '#include "veil.h"'
BPFFS = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR = BPFFS / "veil"
BTF = Path("/sys/kernel/btf/vmlinux")
SO_NETNS_COOKIE = 71
POD_IFNAME = "eth0"
TC_PRIO = 1
ACCEPT_LOCAL = "net.ipv4.conf.lo.accept_local"
TC_INGRESS, TC_EGRESS = "ffff:fff2", "ffff:fff3"
COUNTERS = (
    "redirected",
    "orig_served",
    "orig_missing",
    "steered",
    "no_listener",
    "replies_local",
    "assign_failed",
)

# bpf_prog_type / bpf_attach_type numbers (uapi/linux/bpf.h)
PROG_SCHED_CLS, PROG_SOCK_OPS, PROG_SOCK_ADDR, PROG_SOCKOPT = 3, 13, 18, 25
ATTACH_SOCK_OPS, ATTACH_CONNECT4, ATTACH_CONNECT6, ATTACH_GETSOCKOPT = 3, 10, 11, 21
ATTACH_GETPEERNAME4, ATTACH_GETPEERNAME6, ATTACH_GETSOCKNAME4, ATTACH_GETSOCKNAME6 = 29, 30, 31, 32


@dataclass(frozen=True)
class Program:
    function: str
    prog_type: int
    expected_attach: int  # -1: none
    cgroup_attach: int  # -1: not a cgroup program


PROGRAMS = {
    "connect4": Program("veil_connect4", PROG_SOCK_ADDR, ATTACH_CONNECT4, ATTACH_CONNECT4),
    "connect6": Program("veil_connect6", PROG_SOCK_ADDR, ATTACH_CONNECT6, ATTACH_CONNECT6),
    "getpeername4": Program(
        "veil_getpeername4", PROG_SOCK_ADDR, ATTACH_GETPEERNAME4, ATTACH_GETPEERNAME4
    ),
    "getpeername6": Program(
        "veil_getpeername6", PROG_SOCK_ADDR, ATTACH_GETPEERNAME6, ATTACH_GETPEERNAME6
    ),
    "getsockname4": Program(
        "veil_getsockname4", PROG_SOCK_ADDR, ATTACH_GETSOCKNAME4, ATTACH_GETSOCKNAME4
    ),
    "getsockname6": Program(
        "veil_getsockname6", PROG_SOCK_ADDR, ATTACH_GETSOCKNAME6, ATTACH_GETSOCKNAME6
    ),
    "sockops": Program("veil_sockops", PROG_SOCK_OPS, -1, ATTACH_SOCK_OPS),
    "getsockopt": Program("veil_getsockopt", PROG_SOCKOPT, ATTACH_GETSOCKOPT, ATTACH_GETSOCKOPT),
    "tc_ingress": Program("veil_tc_ingress", PROG_SCHED_CLS, -1, -1),
    "tc_egress": Program("veil_tc_egress", PROG_SCHED_CLS, -1, -1),
}
POD_CGROUP_PROGRAMS = (
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
    "getsockname4",
    "getsockname6",
    "sockops",
)


def program_text(ebpf_dir: Path = EBPF_DIR) -> str:
    """One bcc module: the shared header, then every hook file (bcc rewrites map calls only in
    the text it is given, so the header is pasted rather than #included)."""
    parts = [(ebpf_dir / "include" / "veil.h").read_text()]
    for hook in HOOKS:
        text = (ebpf_dir / hook).read_text()
        if INCLUDE not in text:
            raise ValueError(f"{ebpf_dir / hook} does not include veil.h")
        parts.append(f"/* ---- {hook} ---- */\n" + text.replace(INCLUDE, "", 1))
    return "\n".join(parts)


def cflags(pin_dir: Path) -> list[str]:
    return [f'-DVEIL_PIN_DIR="{pin_dir}"']


def headers_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def preflight() -> None:
    """The causes bcc itself would report obscurely, each with its fix."""

    try:
        cgroup2.root()
    except cgroup2.CgroupError as e:
        raise CaptureError(
            f"eBPF capture attaches to cgroup v2 groups: {e}; or use --capture iptables"
        ) from None
    if not BTF.exists():
        raise CaptureError(
            f"eBPF capture needs kernel BTF ({BTF} is missing; the verifier needs it for "
            "bpf_sk_assign): use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or --capture iptables"
        )
    if not (headers_dir() / "include").exists():
        raise CaptureError(
            f"eBPF capture needs kernel headers for bcc at {headers_dir()} (missing): "
            "apt-get install linux-headers-amd64 and link its directories there "
            "(make setup does both), or use --capture iptables"
        )
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError as e:
        raise CaptureError(
            f"eBPF capture needs bcc ({e}): apt-get install python3-bpfcc "
            "(make setup links it into the virtualenv), or use --capture iptables"
        ) from None


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """bcc/LLVM and the verifier write to fd 2 directly: keep what they said for the error."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read())


def summarize(text: str, lines: int = 6) -> str:
    """The lines of a compiler or verifier log that say what went wrong."""
    keep = [
        ln.strip()
        for ln in text.splitlines()
        if re.search(r"error|invalid|denied|unknown|not allowed|R\d+ ", ln, re.I)
    ]
    return " | ".join((keep or text.strip().splitlines() or ["no output"])[-lines:])


def ensure_bpffs() -> None:
    """bpffs at /sys/fs/bpf (where pinned maps live); mounted if missing, as Cilium does."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[:1] == ["bpf"] and pre.split()[4] == str(BPFFS):
            return
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CaptureError(
            f"cannot mount bpffs at {BPFFS}: {proc.stderr.strip()} "
            "(mount -t bpf bpf /sys/fs/bpf, or run the agent with /sys/fs/bpf mounted)"
        )


def own_cgroup() -> Path:
    """This process's cgroup v2 group, where getsockopt.c is attached."""

    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            return cgroup2.root() / path.lstrip("/")
    raise CaptureError("this process is in no cgroup v2 group: eBPF capture needs cgroup v2")


def netns_cookie(netns_path: str) -> int:
    ns = NetNs(netns_path)
    try:
        s = ns.socket(mark=False)
    finally:
        ns.close()
    with s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    cookie: int = struct.unpack("=Q", raw)[0]
    return cookie


@contextlib.contextmanager
def opened_dir(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class EbpfCapture:
    """Loaded once per agent (`start`), then `install`/`remove` per pod; `close` at exit."""

    mode = "ebpf"

    def __init__(self, pin_dir: Path = DEFAULT_PIN_DIR, agent_cgroup: Path | None = None) -> None:
        self.pin_dir = pin_dir
        self.agent_cgroup = agent_cgroup
        self._bpf: Any = None
        self._fns: dict[str, Any] = {}
        self._cookies: dict[str, int] = {}  # netns path -> cookie, of pods installed by us
        self._hooked_cgroup: Path | None = None

    # -- agent lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Load, then attach the agent-wide program; every failure names cause and fix."""
        self.load()
        cgroup = self.agent_cgroup or own_cgroup()
        self._attach_cgroup(str(cgroup), "getsockopt")
        self._hooked_cgroup = cgroup
        log.info("eBPF capture loaded (maps pinned in %s, getsockopt on %s)", self.pin_dir, cgroup)

    def load(self, ebpf_dir: Path = EBPF_DIR) -> None:
        """Compile ebpf/ and load every program through the verifier (nothing attached)."""
        preflight()
        ensure_bpffs()
        self.pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        from bcc import BPF  # noqa: PLC0415 - Debian's python3-bpfcc, checked in preflight

        with captured_stderr() as said:
            try:
                self._bpf = BPF(
                    text=program_text(ebpf_dir).encode(),
                    cflags=cflags(self.pin_dir),
                )
            except Exception:
                failed = True
            else:
                failed = False
        if failed:
            raise CaptureError(
                f"bcc could not compile ebpf/ against {headers_dir()}: {summarize(said[0])} "
                "(check the kernel headers: make setup; or use --capture iptables)"
            )
        for key, prog in PROGRAMS.items():
            with captured_stderr() as said:
                try:
                    fn = self._bpf.load_func(
                        prog.function.encode(), prog.prog_type, attach_type=prog.expected_attach
                    )
                except Exception as e:
                    err: Exception | None = e
                else:
                    err = None
            if err is not None:
                raise CaptureError(
                    f"the kernel refused eBPF program {prog.function} ({err}): "
                    f"{summarize(said[0])} (kernel too old for this hook? use --capture iptables)"
                )
            self._fns[key] = fn

    def program_fd(self, key: str) -> int:
        fd: int = self._fns[key].fd
        return fd

    def close(self, handed_over: bool = False) -> None:
        """Detach the agent-wide program, unless a successor took over: it attached its own in
        our program's place on the same cgroup, and a detach would take that one away (without
        BPF_F_ALLOW_MULTI the kernel detaches whatever is attached). Maps stay pinned while
        pods still use them."""
        if self._bpf is None:
            return
        if self._hooked_cgroup is not None and not handed_over:
            with contextlib.suppress(OSError, CaptureError):
                self._detach_cgroup(str(self._hooked_cgroup), "getsockopt")
            self._hooked_cgroup = None
        if not len(self._bpf[b"veil_pods"]):
            for f in self.pin_dir.glob("*"):
                f.unlink()
            with contextlib.suppress(OSError):
                self.pin_dir.rmdir()
        self._bpf.cleanup()
        self._bpf = None

    def counters(self) -> dict[str, int]:
        if self._bpf is None:
            return {}
        table = self._bpf[b"veil_counters"]
        return {name: int(table[table.Key(i)].value) for i, name in enumerate(COUNTERS)}

    def forget_others(self) -> None:
        """Drop pod entries this agent did not (re)install: pods that went away while it was
        down (netns cookies are never reused, so a stale entry only takes space)."""
        if self._bpf is None:
            return
        pods = self._bpf[b"veil_pods"]
        mine = set(self._cookies.values())
        for key in list(pods.keys()):
            if key.value not in mine:
                del pods[key]

    # -- per pod -------------------------------------------------------------------------------

    def install(self, t: CaptureTarget) -> None:
        """Idempotent; on failure nothing of this pod's capture is left half-installed."""
        if self._bpf is None:
            raise CaptureError("eBPF capture is not loaded")
        if not t.cgroup or not Path(t.cgroup).is_dir():
            raise CaptureError(
                f"pod cgroup {t.cgroup or '(none)'} does not exist: eBPF capture attaches to the "
                "pod's cgroup v2 group before its processes start"
            )
        try:
            cookie = netns_cookie(t.netns)
            pods = self._bpf[b"veil_pods"]
            pods[pods.Key(cookie)] = pods.Leaf(struct.unpack("=I", socket.inet_aton(t.ip))[0], 0)
            self._cookies[t.netns] = cookie
            for key in POD_CGROUP_PROGRAMS:
                self._attach_cgroup(t.cgroup, key)
            self._attach_tc(t.netns)
            iptables.install_routing(t.netns)
            # Replies handed to lo carry the pod's own address as source: accept them there.
            iptables.run_in(t.netns, ["sysctl", "-qw", f"{ACCEPT_LOCAL}=1"])
        except (OSError, NetnsError, CaptureError) as e:
            with contextlib.suppress(Exception):
                self.remove(t)
            raise CaptureError(f"eBPF capture of {t.netns}: {e}") from None

    def remove(self, t: CaptureTarget) -> None:
        """Detach everything from the pod; a pod that is already gone is not an error."""
        errors: list[str] = []
        if t.cgroup and Path(t.cgroup).is_dir():
            for key in POD_CGROUP_PROGRAMS:
                try:
                    self._detach_cgroup(t.cgroup, key)
                except CaptureError as e:
                    errors.append(str(e))
        if Path(t.netns).exists():
            try:
                self._detach_tc(t.netns)
                iptables.remove_routing(t.netns)
                iptables.run_in(t.netns, ["sysctl", "-qw", f"{ACCEPT_LOCAL}=0"])
            except (OSError, CaptureError) as e:
                errors.append(str(e))
        cookie = self._cookies.pop(t.netns, None)
        if cookie is None and Path(t.netns).exists():
            with contextlib.suppress(OSError, NetnsError):
                cookie = netns_cookie(t.netns)
        if cookie is not None and self._bpf is not None:
            pods = self._bpf[b"veil_pods"]
            with contextlib.suppress(KeyError):
                del pods[pods.Key(cookie)]
        if errors:
            raise CaptureError("; ".join(errors))

    # -- attach/detach ---------------------------------------------------------------------------

    def _attach_cgroup(self, cgroup: str, key: str) -> None:
        from bcc import BPF  # noqa: PLC0415

        prog = PROGRAMS[key]
        with opened_dir(cgroup) as fd:
            try:
                BPF.attach_func(self._fns[key], fd, prog.cgroup_attach)  # flags 0: replace
            except Exception as e:
                raise CaptureError(f"attaching {prog.function} to {cgroup}: {e}") from None

    def _detach_cgroup(self, cgroup: str, key: str) -> None:
        from bcc import BPF  # noqa: PLC0415

        prog = PROGRAMS[key]
        with opened_dir(cgroup) as fd:
            try:
                BPF.detach_func(self._fns[key], fd, prog.cgroup_attach)
            except Exception as e:
                if os.strerror(errno.ENOENT) not in str(e):
                    raise CaptureError(f"detaching {prog.function} from {cgroup}: {e}") from None

    def _attach_tc(self, netns_path: str) -> None:
        from pyroute2 import IPRoute  # noqa: PLC0415

        with IPRoute(netns=netns_path) as ipr:
            idx = _ifindex(ipr, netns_path)
            with contextlib.suppress(Exception):  # already there
                ipr.tc("add", "clsact", idx)
            for key, parent in (("tc_ingress", TC_INGRESS), ("tc_egress", TC_EGRESS)):
                fn = self._fns[key]
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    idx,
                    ":1",
                    fd=fn.fd,
                    name=fn.name.decode(),
                    parent=parent,
                    classid=1,
                    direct_action=True,
                    prio=TC_PRIO,
                )

    def _detach_tc(self, netns_path: str) -> None:
        from pyroute2 import IPRoute  # noqa: PLC0415
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

        with IPRoute(netns=netns_path) as ipr:
            links = ipr.link_lookup(ifname=POD_IFNAME)
            if not links:
                return
            try:
                ipr.tc("del", "clsact", links[0])
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise CaptureError(f"removing tc programs in {netns_path}: {e}") from None


def _ifindex(ipr: Any, netns_path: str) -> int:
    links = ipr.link_lookup(ifname=POD_IFNAME)
    if not links:
        raise CaptureError(f"no {POD_IFNAME} in {netns_path}: the pod network is not set up")
    index: int = links[0]
    return index
