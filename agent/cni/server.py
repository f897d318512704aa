"""The agent's side of veil-cni: one JSON request per unix-socket connection, one answer.

    {"command": "ADD", "namespace": "shop", "name": "web-0", "netns": "/run/netns/x",
     "ip": "10.244.1.10"}                      -> {"ok": true, "enrolled": true}
    {"command": "DEL", "namespace": ..., "name": ...}  -> {"ok": true}
    {"command": "CHECK", ...}                  -> {"ok": true, "enrolled": false}
    anything failing                            -> {"ok": false, "error": "<why>"}

ADD answers only once capture and listeners are in place (or the pod is not in the mesh).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import trio

from veil.agent.enrollment import EnrollError, Enrollment
from veil.runtime import guard

log = logging.getLogger("veil.cni")
MAX_REQUEST = 64 * 1024


async def handle(enrollment: Enrollment, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req.get("command")
    ns, name = str(req.get("namespace", "")), str(req.get("name", ""))
    if not ns or not name:
        return {"ok": False, "error": "namespace and name are required"}
    if cmd == "ADD":
        enrolled = await enrollment.cni_add(ns, name, str(req["netns"]), str(req["ip"]))
        return {"ok": True, "enrolled": enrolled}
    if cmd == "DEL":
        await enrollment.cni_del(ns, name)
        return {"ok": True}
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

    async def serve_one(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            with trio.move_on_after(10):
                while b"\n" not in buf and len(buf) < MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    buf += chunk
            req: Any = None
            try:
                req = json.loads(buf)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
                answer = await handle(enrollment, req)
            except (ValueError, KeyError) as e:
                answer = {"ok": False, "error": f"bad request: {e}"}
            except EnrollError as e:
                answer = {"ok": False, "error": str(e)}
            what = (
                f"{req.get('command')} {req.get('namespace')}/{req.get('name')}"
                if isinstance(req, dict)
                else "malformed request"
            )
            log.info("cni %s: %s", what, answer)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(answer).encode() + b"\n")

    try:
        task_status.started()
        await trio.serve_listeners(on_conn, [listener])
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == ino:  # not yet replaced by a successor's
                path.unlink()
