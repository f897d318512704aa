"""Run inside a lab pod (`veil lab exec <pod> -- python grpcstreams.py <address>`): every kind
of call of grpcserver.py's `veil.Test` with grpcio, printing what came back as JSON. Bidi is
a ping-pong: each message is sent only after the answer to the one before arrived, which
only works when both directions of the stream move at once."""

from __future__ import annotations

import json
import os
import queue
import sys
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
import grpc  # type: ignore[import-untyped]


def main() -> None:
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    out: dict[str, Any] = {}
    with grpc.insecure_channel(sys.argv[1]) as ch:
        out["unary"] = ch.unary_unary("/veil.Test/Unary", **raw)(b"hi", timeout=10).decode()
        stream = ch.unary_stream("/veil.Test/ServerStream", **raw)(b"s", timeout=10)
        out["server_stream"] = [m.decode() for m in stream]
        client = ch.stream_unary("/veil.Test/ClientStream", **raw)
        out["client_stream"] = client(iter([b"a", b"b", b"c"]), timeout=10).decode()
        turns: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (m := turns.get(timeout=10)) is not None:
                yield m

        turns.put(b"ping0")
        answers = []
        for answer in ch.stream_stream("/veil.Test/Bidi", **raw)(requests(), timeout=10):
            answers.append(answer.decode())
            turns.put(f"ping{len(answers)}".encode() if len(answers) < 3 else None)
        out["bidi"] = answers
        try:
            ch.unary_unary("/veil.Test/Fail", **raw).with_call(b"", timeout=10)
        except grpc.RpcError as e:
            trailing = dict(e.trailing_metadata() or ())
            out["fail"] = [e.code().name, e.details(), trailing.get("x-why")]
        try:
            ch.unary_unary("/veil.Test/Slow", **raw)(b"", timeout=1)
        except grpc.RpcError as e:
            out["slow"] = e.code().name
        out["big"] = len(ch.unary_unary("/veil.Test/Big", **raw)(b"x" * (1 << 20), timeout=20))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
