"""What h11 costs the waypoint per request, and what llhttp (httptools) would.

    .venv/bin/python bench/experiments/h1_parse.py            # h11 only
    .venv/bin/pip install httptools && .venv/bin/python bench/experiments/h1_parse.py

Per request, as the waypoint uses h11 on a keep-alive connection: the client-facing side
(`h11.SERVER`: the request parsed, a small response written, the next cycle) and the
backend side (`h11.CLIENT`: the request written, the response parsed). With httptools
installed, the client-facing side again with llhttp parsing the request into the same h11
events (the response written by hand): the saving a C parser could bring at most, before the
semantics the waypoint needs from h11 are rebuilt around it (see bench/HISTORY.md).
A measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.proc import speed_probe

REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: backend.bench.svc.cluster.local\r\n"
    b"User-Agent: h2load nghttp2/1.52.0\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
    b"Date: Thu, 03 Dec 2026 19:00:00 GMT\r\n\r\nhello, world\n"
)
N = 20000


def h11_client_facing() -> None:
    down = h11.Connection(h11.SERVER)
    for _ in range(N):
        down.receive_data(REQUEST)
        assert isinstance(down.next_event(), h11.Request)
        assert isinstance(down.next_event(), h11.EndOfMessage)
        down.send(h11.Response(status_code=200, headers=[(b"content-length", b"13")]))
        down.send(h11.Data(data=b"hello, world\n"))
        down.send(h11.EndOfMessage())
        down.start_next_cycle()


def h11_backend_side() -> None:
    up = h11.Connection(h11.CLIENT)
    headers = [(b"host", b"backend"), (b"user-agent", b"h2load"), (b"accept", b"*/*")]
    for _ in range(N):
        up.send(h11.Request(method=b"GET", target=b"/index.html", headers=headers))
        up.send(h11.EndOfMessage())
        up.receive_data(RESPONSE)
        assert isinstance(up.next_event(), h11.Response)
        assert isinstance(up.next_event(), h11.Data)
        assert isinstance(up.next_event(), h11.EndOfMessage)
        up.start_next_cycle()


def llhttp_client_facing(httptools: Any) -> Callable[[], None]:
    class Events:
        def __init__(self) -> None:
            self.url, self.headers, self.out = b"", [], []  # type: ignore[var-annotated]
            self.parser: Any = None

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_headers_complete(self) -> None:
            method = self.parser.get_method()
            self.out.append(
                h11.Request(method=method, target=self.url, headers=self.headers, _parsed=True)
            )

        def on_message_complete(self) -> None:
            self.out.append(h11.EndOfMessage())
            self.url, self.headers = b"", []

    def run() -> None:
        events = Events()
        parser = events.parser = httptools.HttpRequestParser(events)
        for _ in range(N):
            parser.feed_data(REQUEST)
            events.out.clear()
            _ = b"HTTP/1.1 200 \r\ncontent-length: 13\r\n\r\n" + b"hello, world\n"

    return run


def per_request_us(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / N * 1e6


def main() -> int:
    print(f"VM speed probe: {speed_probe():.3f} s (bench/hbone.py's, ~0.08 fast)")
    print(f"h11, client-facing side: {per_request_us(h11_client_facing):.1f} µs per request")
    print(f"h11, backend side:       {per_request_us(h11_backend_side):.1f} µs per request")
    try:
        httptools = importlib.import_module("httptools")
    except ImportError:
        print("httptools not installed: the llhttp row is left out")
        return 0
    run = llhttp_client_facing(httptools)
    print(f"llhttp, client-facing side (parse only, events as h11's): {per_request_us(run):.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
