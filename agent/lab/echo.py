"""A small HTTP/1.1 echo workload for examples and tests (`veil echo`).

Answers every request with JSON naming the pod that served it (from the downward-API-like
environment the lab sets), the client address it saw and the request headers, so a test can
tell which pod answered and whether the source address survived the path. `/status/<code>`
answers with that status code (for retry and outlier tests later).
"""

from __future__ import annotations

import json
import os
import sys

import h11
import trio

IDLE_TIMEOUT = 60.0
MAX_BODY = 1 << 20


def describe(request: h11.Request, client: str, body_len: int) -> dict[str, object]:
    return {
        "pod": os.environ.get("POD_NAME", ""),
        "namespace": os.environ.get("POD_NAMESPACE", ""),
        "node": os.environ.get("NODE_NAME", ""),
        "podIP": os.environ.get("POD_IP", ""),
        "client": client,
        "method": request.method.decode(),
        "path": request.target.decode(),
        "headers": {k.decode(): v.decode(errors="replace") for k, v in request.headers},
        "bodyBytes": body_len,
    }


def status_for(target: bytes) -> int:
    parts = target.split(b"?")[0].split(b"/")
    if len(parts) == 3 and parts[1] == b"status" and parts[2].isdigit():
        code = int(parts[2])
        if 200 <= code <= 599:
            return code
    return 200


async def handle(stream: trio.SocketStream) -> None:
    """One connection: requests in a keep-alive loop until the client closes or idles out."""
    host, port = stream.socket.getpeername()[:2]
    client = f"{host}:{port}"
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request: h11.Request | None = None
            body_len = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(IDLE_TIMEOUT):
                        data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body_len += len(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            body = json.dumps(describe(request, client, body_len), indent=1).encode() + b"\n"
            headers = [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("x-served-by", os.environ.get("POD_NAME", "echo")),
            ]
            out = conn.send(h11.Response(status_code=status_for(request.target), headers=headers))
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (
        h11.RemoteProtocolError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    ):
        return
    finally:
        await stream.aclose()


async def serve(port: int, host: str = "0.0.0.0") -> None:
    await trio.serve_tcp(handle, port, host=host)


def main(port: int, host: str = "0.0.0.0") -> None:
    print(
        f"echo: pod {os.environ.get('POD_NAME', '?')} listening on {host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    trio.run(serve, port, host)
