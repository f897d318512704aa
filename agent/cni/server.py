"""The agent's side of veil-cni: the node's CNI shim forwards each request here, one per
unix-socket connection, and prints the answer (agent/cni/shim/veil-cni.c):

    request:  "CNI/1\\n" "CNI_COMMAND=ADD\\n" ... "\\n" <the network configuration>
    answer:   "<exit code>\\n" <the plugin's stdout>

`plugin.answer()` decides; enrollment requests go to `handle()`, which answers ADD only once
capture and listeners are in place (or the pod is not in the mesh).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import trio

from veil.agent.cni import plugin
from veil.agent.enrollment import EnrollError, Enrollment
from veil.runtime import guard

log = logging.getLogger("veil.cni")
MAX_REQUEST = 1024 * 1024
MAGIC = b"CNI/1\n"
ENV_KEYS = frozenset(
    ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
)


class BadRequest(ValueError):
    pass


def parse_request(data: bytes) -> tuple[dict[str, str], str]:
    """The shim's request: its CNI_* environment and stdin. Pure."""
    if not data.startswith(MAGIC):
        raise BadRequest("not a veil-cni request")
    rest = data[len(MAGIC) :]
    if rest.startswith(b"\n"):  # no variables at all
        head, body = b"", rest[1:]
    else:
        head, sep, body = rest.partition(b"\n\n")
        if not sep:
            raise BadRequest("truncated request")
    env: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\n") if head else ():
        key, eq, value = line.partition("=")
        if not eq or key not in ENV_KEYS:
            raise BadRequest(f"unexpected line {line[:40]!r}")
        env[key] = value
    return env, body.decode("utf-8", "replace")


async def handle(enrollment: Enrollment, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req.get("command")
    ns, name = str(req.get("namespace", "")), str(req.get("name", ""))
    if not ns or not name:
        return {"ok": False, "error": "namespace and name are required"}
    try:
        if cmd == "ADD":
            enrolled = await enrollment.cni_add(ns, name, str(req["netns"]), str(req["ip"]))
            return {"ok": True, "enrolled": enrolled}
        if cmd == "DEL":
            await enrollment.cni_del(ns, name)
            return {"ok": True}
    except EnrollError as e:
        return {"ok": False, "error": str(e)}
    if cmd == "CHECK":
        return {"ok": True, "enrolled": f"{ns}/{name}" in enrollment.pods}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


async def serve(
    enrollment: Enrollment,
    path: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(tmp))
    tmp.chmod(0o600)
    sock.listen(128)
    tmp.replace(path)  # atomically: a predecessor's socket answers until this instant
    ino = path.stat().st_ino
    listener = trio.SocketListener(sock)

    async def on_conn(stream: trio.SocketStream) -> None:
        await guard.guarded("cni_request", serve_one, stream, cleanup=stream.socket.close)

    async def ask(req: dict[str, Any]) -> dict[str, Any]:
        started = trio.current_time()
        got = await handle(enrollment, req)
        log.info(
            "cni %s %s/%s: %s (%.0f ms)",
            req.get("command"),
            req.get("namespace"),
            req.get("name"),
            got,
            (trio.current_time() - started) * 1000,
        )
        return got

    async def serve_one(stream: trio.SocketStream) -> None:
        async with stream:
            buf = bytearray()
            with trio.move_on_after(10):
                while len(buf) <= MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    buf += chunk
            try:
                env, stdin = parse_request(bytes(buf))
                code, out = await plugin.answer(env, stdin, ask)
            except BadRequest as e:
                log.warning("cni: bad request from the shim: %s", e)
                code, out = plugin.error("1.0.0", 6, f"veil agent: bad request: {e}")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(f"{code}\n".encode() + out.encode())

    try:
        task_status.started()
        await trio.serve_listeners(on_conn, [listener])
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == ino:  # not yet replaced by a successor's
                path.unlink()
