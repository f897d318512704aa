"""Run inside a lab pod (`veil lab exec <pod> -- python grpcserver.py <port>`): a grpcio server
(a real gRPC implementation) of service `veil.Test`, raw bytes in and out: Unary echoes,
ServerStream answers three copies, ClientStream joins what came, Bidi answers each message as
it comes, Fail aborts with FAILED_PRECONDITION and trailing metadata, Slow waits 3 s, Big
answers 1 MiB. Prints `ready` once listening."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc  # type: ignore[import-untyped]


def fail(request: bytes, context: Any) -> bytes:
    context.set_trailing_metadata((("x-why", "because"),))
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no, because")
    return b""


def slow(request: bytes, context: Any) -> bytes:
    time.sleep(3)
    return request


def copies(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(3):
        yield request + str(i).encode()


def main() -> None:
    raw: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda r, c: r, **raw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(copies, **raw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(lambda it, c: b"+".join(it), **raw),
        "Bidi": grpc.stream_stream_rpc_method_handler(lambda it, c: (m.upper() for m in it), **raw),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, **raw),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, **raw),
        "Big": grpc.unary_unary_rpc_method_handler(lambda r, c: b"x" * (1 << 20), **raw),
    }
    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("veil.Test", handlers),))
    server.add_insecure_port(f"0.0.0.0:{sys.argv[1]}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
