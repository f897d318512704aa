"""Coverage-guided fuzzing (atheris) of every parser that sees untrusted bytes.

    .venv/bin/python -m tests.fuzz.harnesses NAME [libFuzzer flags, e.g. -max_total_time=60]
    make fuzz FUZZ_SECONDS=60            # every harness in turn

Each harness feeds fuzzer bytes to one parser and fails (an uncaught exception, which libFuzzer
reports with the input that caused it) when the parser does anything but succeed or refuse
with its own error type. Found crashes become regression tests next to the parser's unit tests.
`tests/fuzz/test_fuzz.py` runs each one briefly in `make test`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import atheris
import trio

with atheris.instrument_imports():
    from veil.agent.cni.plugin import answer as cni_answer
    from veil.agent.cni.server import BadRequest, parse_request
    from veil.core import clienthello
    from veil.core.authz import PolicyError, PolicySet, parse_policy
    from veil.core.hbone import (
        PREFACE,
        HboneConnection,
        HboneProtocolError,
        RequestReceived,
        check_request,
        decode_plain,
    )
    from veil.core.jwt import JwtError, parse_request_authentication
    from veil.core.routes import RouteError, parse_route
    from veil.core.traffic import PolicyError as TrafficPolicyError
    from veil.core.traffic import parse_traffic_policy
    from veil.lab import echo
    from veil.waypoint import http1
    from veil.waypoint.normalize import BadTarget, PathNormalization, normalize_target

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame


def hbone_server(data: bytes) -> None:
    """HBONE's HTTP/2 as a server: any bytes after a valid preface and SETTINGS."""
    conn = HboneConnection(client=False)
    try:
        for ev in conn.receive_data(PREFACE + SETTINGS + data):
            if isinstance(ev, RequestReceived):
                check_request(ev)
    except HboneProtocolError:
        return


def hbone_client(data: bytes) -> None:
    """HBONE's HTTP/2 as a client, after opening a stream: any answer."""
    conn = HboneConnection(client=True)
    conn.connect("10.0.0.1:80")
    conn.data_to_send()
    try:
        conn.receive_data(SETTINGS + data)
    except HboneProtocolError:
        return


def hpack_fast_path(data: bytes) -> None:
    decode_plain(data)


def http1_detection(data: bytes) -> None:
    http1.detect(data)
    http1.framing_doubt(data)
    http1.skip_empty_lines(data)


def path_normalization(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = list(PathNormalization)[fdp.ConsumeIntInRange(0, 3)]
    raw = fdp.ConsumeUnicodeNoSurrogates(256)
    try:
        once = normalize_target(raw, mode, "OPTIONS")
    except BadTarget:
        return
    # One spelling per resource: normalizing the result again changes nothing.
    twice = normalize_target(once.target, mode, "OPTIONS")
    if mode is not PathNormalization.NONE and twice.path != once.path:
        raise AssertionError(f"{mode.value}: {raw!r} -> {once.path!r} -> {twice.path!r}")


# Field names the parsers know (and a few they do not): structured documents reach far deeper
# into a parser than JSON made of random bytes ever does.
WORDS = [
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "name",
    "namespace",
    "labels",
    "action",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "principals",
    "notPrincipals",
    "namespaces",
    "ipBlocks",
    "notIpBlocks",
    "ports",
    "notPorts",
    "methods",
    "paths",
    "hosts",
    "notHosts",
    "requestPrincipals",
    "serviceAccounts",
    "key",
    "values",
    "notValues",
    "selector",
    "matchLabels",
    "targetRef",
    "targetRefs",
    "group",
    "parentRefs",
    "sectionName",
    "backendRefs",
    "port",
    "weight",
    "matches",
    "path",
    "type",
    "value",
    "headers",
    "queryParams",
    "method",
    "filters",
    "requestHeaderModifier",
    "set",
    "add",
    "remove",
    "requestRedirect",
    "urlRewrite",
    "replaceFullPath",
    "replacePrefixMatch",
    "requestMirror",
    "backendRef",
    "timeouts",
    "request",
    "backendRequest",
    "retry",
    "attempts",
    "codes",
    "backoff",
    "jwtRules",
    "issuer",
    "jwks",
    "jwksUri",
    "audiences",
    "fromHeaders",
    "prefix",
    "fromParams",
    "outputClaimToHeaders",
    "header",
    "claim",
    "forwardOriginalToken",
    "faults",
    "delay",
    "fixedDelay",
    "abort",
    "httpStatus",
    "percent",
    "rateLimit",
    "requestsPerSecond",
    "burst",
    "connectionPool",
    "maxConnections",
    "outlierDetection",
    "consecutive5xxErrors",
    "baseEjectionTime",
    "services",
    "routes",
    "Exact",
    "PathPrefix",
    "RegularExpression",
    "ALLOW",
    "DENY",
    "AUDIT",
    "CUSTOM",
    "Gateway",
    "Service",
    "GatewayClass",
    "HTTPRoute",
    "veil-waypoint",
    "veil-system",
    "cluster.local/ns/a/sa/b",
    "/admin*",
    "*",
    "10.0.0.0/8",
    "80",
    "8080",
    "1s",
    "100ms",
    "GET",
    "POST",
]


def value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    choice = fdp.ConsumeIntInRange(0, 9 if depth < 4 else 5)
    if choice <= 2:
        return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
    if choice == 3:
        return fdp.ConsumeIntInRange(-2, 70000)
    if choice == 4:
        return [None, True, False, 1.5][fdp.ConsumeIntInRange(0, 3)]
    if choice == 5:
        return fdp.ConsumeUnicodeNoSurrogates(16)
    if choice <= 7:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {
        WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]: value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


API = {
    "AuthorizationPolicy": "security.veil.dev/v1",
    "RequestAuthentication": "security.veil.dev/v1",
    "TrafficPolicy": "traffic.veil.dev/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}


def document(fdp: atheris.FuzzedDataProvider, kind: str) -> dict[str, object]:
    return {
        "apiVersion": API[kind],
        "kind": kind,
        "metadata": {"namespace": "a", "name": "x"},
        "spec": value(fdp, 1)
        if fdp.ConsumeBool()
        else {
            WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]: value(fdp, 2)
            for _ in range(fdp.ConsumeIntInRange(1, 5))
        },
    }


def _json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


def policies(data: bytes) -> None:
    """Each parser on documents of its kind whose spec is made of known field names and odd
    values: it accepts them or refuses with its own error, nothing else."""
    fdp = atheris.FuzzedDataProvider(data)
    for kind, parse, errors in (
        ("AuthorizationPolicy", parse_policy, (PolicyError,)),
        ("HTTPRoute", parse_route, (RouteError,)),
        ("TrafficPolicy", parse_traffic_policy, (TrafficPolicyError,)),
        ("RequestAuthentication", parse_request_authentication, (JwtError,)),
    ):
        doc = document(fdp, kind)
        with contextlib.suppress(*errors):
            parse(doc)
        if kind == "AuthorizationPolicy":
            PolicySet().update([doc])  # what the state's writer calls: it never raises


def cni_stdin(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    command = ["ADD", "DEL", "CHECK", "VERSION", ""][fdp.ConsumeIntInRange(0, 4)]
    env = {"CNI_COMMAND": command, "CNI_ARGS": fdp.ConsumeUnicodeNoSurrogates(64)}
    if fdp.ConsumeBool():
        stdin = fdp.ConsumeUnicodeNoSurrogates(512)
    else:  # shaped like a chained plugin's input, with odd values
        doc = {
            "cniVersion": value(fdp, 3),
            "name": "net",
            "prevResult": {"ips": value(fdp, 2), "interfaces": []}
            if fdp.ConsumeBool()
            else value(fdp),
        }
        if fdp.ConsumeBool():
            doc["agentSocket"] = value(fdp, 4)
        stdin = json.dumps(doc)

    async def ask(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": fdp.ConsumeBool(), "error": "refused"}

    code, out = trio.run(cni_answer, env, stdin, ask)
    if code not in (0, 1) or (out and not isinstance(json.loads(out), dict)):
        raise AssertionError(f"exit code {code}, output {out!r}")
    # The agent's side of the shim's wire format: refused or parsed, never a crash.
    with contextlib.suppress(BadRequest):
        parse_request(b"CNI/1\n" + data[:256])


def tls_client_hello(data: bytes) -> None:
    """connection.sni: the waypoint reads the server name of any stream that starts like a
    TLS record; the answer is a name, None, or a Hello marker, never an exception."""
    body = b"\x03\x03" + bytes(32) + data  # past version and random: the fuzzer's bytes
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    framed = b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello
    for candidate in (data, b"\x16\x03\x01" + data, framed):
        got = clienthello.server_name(candidate)
        assert got is None or isinstance(got, str | clienthello.Hello)
        if isinstance(got, str):
            assert got and got == got.lower() and not got.endswith(".")


def websocket_frames(data: bytes) -> None:
    """The lab's WebSocket echo (a peer of the waypoint's WebSocket relay): client frames."""
    buf = bytearray(data)
    with contextlib.suppress(ValueError):
        for opcode, payload in echo.ws_frames(buf):
            assert 0 <= opcode <= 0xF and isinstance(payload, bytes)


HARNESSES: dict[str, Callable[[bytes], None]] = {
    f.__name__: f
    for f in (
        hbone_server,
        hbone_client,
        hpack_fast_path,
        http1_detection,
        path_normalization,
        policies,
        cni_stdin,
        tls_client_hello,
        websocket_frames,
    )
}


def main() -> None:
    name, *flags = sys.argv[1:]
    atheris.Setup([sys.argv[0], *flags], HARNESSES[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
