"""A small HTTP/1.1 echo workload for examples and tests (`veil echo`).

Answers every request with JSON naming the pod that served it (from the downward-API-like
environment the lab sets), the client address it saw and the request headers, so a test can
tell which pod answered and whether the source address survived the path. For resilience
tests and demos: `/status/<code>` answers with that status code, `/delay/<ms>` answers after
that long, and `ECHO_FAIL=<code>` in the environment makes the pod answer every request with
that status (a broken replica).
"""

from __future__ import annotations

import os
import sys

import trio

from veil.runtime import http

MAX_BODY = 64 * 1024 * 1024  # uploads in tests; the body is counted, not kept


def describe(req: http.Request) -> dict[str, object]:
    return {
        "pod": os.environ.get("POD_NAME", ""),
        "namespace": os.environ.get("POD_NAMESPACE", ""),
        "node": os.environ.get("NODE_NAME", ""),
        "podIP": os.environ.get("POD_IP", ""),
        "client": req.peer,
        "method": req.method,
        "path": req.target,
        "headers": dict(req.headers),
        "bodyBytes": len(req.body),
    }


def status_for(target: str) -> int:
    parts = target.split("?", maxsplit=1)[0].split("/")
    if len(parts) == 3 and parts[1] == "status" and parts[2].isdigit():
        code = int(parts[2])
        if 200 <= code <= 599:
            return code
    return 200


def delay_for(target: str) -> float:
    parts = target.split("?", maxsplit=1)[0].split("/")
    if len(parts) == 3 and parts[1] == "delay" and parts[2].isdigit():
        return min(int(parts[2]), 60_000) / 1000
    return 0.0


async def handle(req: http.Request) -> http.Response:
    if wait := delay_for(req.target):
        await trio.sleep(wait)
    fail = os.environ.get("ECHO_FAIL", "")
    status = int(fail) if fail.isdigit() else status_for(req.target)
    doc = http.Response.json(status, describe(req))
    return http.Response(
        doc.status, doc.body, doc.content_type, {"x-served-by": os.environ.get("POD_NAME", "echo")}
    )


async def serve(port: int, host: str = "0.0.0.0") -> None:
    await http.serve(handle, host, port, max_body=MAX_BODY)


def main(port: int, host: str = "0.0.0.0") -> None:
    print(
        f"echo: pod {os.environ.get('POD_NAME', '?')} listening on {host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    trio.run(serve, port, host)
