"""Run inside a lab pod (`veil lab exec <pod> -- python grpcclient.py <address> '<json>'`):
unary calls with grpcio (a real gRPC client) on one channel, as Gateway API's clients send
them. The JSON is a list of calls, `{"method": "/svc/Method", "metadata": {...}}`, or a
number of calls of Istio's echo. Prints for each the `Hostname` of the echo's answer, or
`error: <CODE> <details>`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("GRPC_DNS_RESOLVER", "native")  # the pod's /etc/hosts via getaddrinfo
import grpc  # type: ignore[import-untyped]

ECHO = "/proto.EchoTestService/Echo"


def hostname(reply: bytes) -> str:
    """Field 1 of an EchoResponse (one length-delimited string) holds `key=value` lines."""
    n, at, shift = 0, 1, 0
    while reply[at] & 0x80:
        n |= (reply[at] & 0x7F) << shift
        at, shift = at + 1, shift + 7
    n |= reply[at] << shift
    text = reply[at + 1 : at + 1 + n].decode()
    return next((line[9:] for line in text.split("\n") if line.startswith("Hostname=")), "")


def main() -> None:
    address, spec = sys.argv[1], json.loads(sys.argv[2])
    calls: list[dict[str, Any]] = [{"method": ECHO}] * spec if isinstance(spec, int) else spec
    out = []
    with grpc.insecure_channel(address) as channel:
        for c in calls:
            call = channel.unary_unary(
                c.get("method", ECHO), request_serializer=None, response_deserializer=None
            )
            metadata = [(k.lower(), v) for k, v in (c.get("metadata") or {}).items()]
            try:
                out.append(hostname(call(b"\x0a\x04ping", timeout=10, metadata=metadata)))
            except grpc.RpcError as e:
                out.append(f"error: {e.code().name} {e.details()}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
