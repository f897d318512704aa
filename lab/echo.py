"""A small HTTP/1.1 echo workload for examples and tests (`veil echo`).

Answers every request with JSON naming the pod that served it (from the downward-API-like
environment the lab sets), the client address it saw and the request headers, so a test can
tell which pod answered and whether the source address survived the path. For resilience
tests and demos: `/status/<code>` answers with that status code, `/delay/<ms>` answers after
that long, and `ECHO_FAIL=<code>` in the environment makes the pod answer every request with
that status (a broken replica); `ECHO_LOG_REQUESTS=1` logs each request. As Gateway API's
echo-basic (for the acceptance suite): `?delay=<duration>` (`500ms`, `1s`) waits that long,
and `?uuid=<id>&succeedAfter=<n>` fails the first n requests with that uuid, with
`?responseCode=<code>` or else by resetting the connection.
"""

from __future__ import annotations

import os
import re
import sys
from urllib.parse import parse_qs

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


DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)")
UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0}


def query_delay(target: str) -> float:
    """`?delay=1s` / `?delay=500ms` (a Go duration, as echo-basic reads it), at most 60 s."""
    _, _, q = target.partition("?")
    value = parse_qs(q).get("delay", [""])[0]
    m = DURATION.fullmatch(value)
    return min(float(m[1]) * UNIT[m[2]], 60.0) if m else 0.0


ATTEMPTS: dict[str, int] = {}


def simulated_failure(target: str) -> int | None:
    """The status to fail this try with (0: reset the connection), or None to answer."""
    _, _, q = target.partition("?")
    args = parse_qs(q)
    uuid, after = args.get("uuid", [""])[0], args.get("succeedAfter", [""])[0]
    if not uuid or not after.isdigit():
        return None
    if ATTEMPTS.get(uuid, 0) >= int(after):
        return None
    ATTEMPTS[uuid] = ATTEMPTS.get(uuid, 0) + 1
    if len(ATTEMPTS) > 10_000:  # bounded: forget the oldest
        del ATTEMPTS[next(iter(ATTEMPTS))]
    code = args.get("responseCode", [""])[0]
    return int(code) if code.isdigit() and 200 <= int(code) <= 599 else 0


LOG_REQUESTS = os.environ.get("ECHO_LOG_REQUESTS") == "1"


async def handle(req: http.Request) -> http.Response:
    if LOG_REQUESTS:  # tests count mirrored requests in the pod's log, as echo-basic's
        print(f"echo: {req.method} {req.target} from {req.peer}", file=sys.stderr, flush=True)
    if wait := delay_for(req.target) or query_delay(req.target):
        await trio.sleep(wait)
    if (failure := simulated_failure(req.target)) is not None:
        if failure == 0:
            raise http.ResetConnection
        return http.Response.json(failure, {"attempt": "failed on purpose"})
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
