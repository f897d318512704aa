"""Coverage-guided fuzzing (atheris) of every parser that sees untrusted bytes.

    .venv/bin/python -m tests.fuzz.harnesses NAME [libFuzzer flags, e.g. -max_total_time=60]
    make fuzz FUZZ_SECONDS=60            # every harness in turn

Each harness feeds fuzzer bytes to one parser and fails (an uncaught exception, which libFuzzer
reports with the input that caused it) when the parser does anything but succeed or refuse
with its own error type. Found crashes become regression tests next to the parser's unit tests.
`tests/fuzz/test_fuzz.py` runs each one briefly in `make test`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import atheris
import h11
import trio

with atheris.instrument_imports():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from veil.agent.cni.plugin import answer as cni_answer
    from veil.agent.cni.server import BadRequest, parse_request
    from veil.ca.auth import AuthError
    from veil.ca.server import _bearer, _field, _json_object
    from veil.ca.signer import Signer, SignError, generate_root
    from veil.core import clienthello, extauthz
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
    from veil.core.routes import RouteError, parse_grpc_route, parse_route, parse_tcp_route
    from veil.core.traffic import PolicyError as TrafficPolicyError
    from veil.core.traffic import parse_traffic_policy
    from veil.lab import echo
    from veil.runtime.hbone.io import HboneError
    from veil.waypoint import http1
    from veil.waypoint.http2 import H2Client
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
    "service",
    "provider",
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
    "GRPCRoute": "gateway.networking.k8s.io/v1",
    "TCPRoute": "gateway.networking.k8s.io/v1",
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
        ("GRPCRoute", parse_grpc_route, (RouteError,)),
        ("TCPRoute", parse_tcp_route, (RouteError,)),
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


TD = "cluster.local"
_SIGNER: list[Signer] = []
_CSR_DER: list[bytes] = []


def _ca() -> tuple[Signer, bytes]:
    """One CA and one valid CSR for the whole run (made on first use: keys cost)."""
    if not _SIGNER:
        _SIGNER.append(Signer(generate_root(TD), TD))
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/a/sa/b")]
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "b")]))
            .add_extension(san, critical=False)
            .sign(key, hashes.SHA256())
        )
        _CSR_DER.append(csr.public_bytes(serialization.Encoding.DER))
    return _SIGNER[0], _CSR_DER[0]


def _pem(der: bytes) -> str:
    lines = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}-----END CERTIFICATE REQUEST-----\n"


def ca_request(data: bytes) -> None:
    """The CA's certificate request past authentication (its auth header too): the JSON body,
    the identity, and a CSR that is the fuzzer's bytes, or a valid CSR with them written over
    it; each refuses with the CA's own errors (a 4xx answer), never anything else."""
    signer, valid = _ca()
    with contextlib.suppress(AuthError):
        _bearer(data.decode("latin-1"))
    at = int.from_bytes(data[:2] or b"\0", "big") % len(valid)
    patched = valid[:at] + data[2:] + valid[at + len(data[2:]) :]
    bodies = [
        data,
        json.dumps({"identity": f"spiffe://{TD}/ns/a/sa/b", "csr": _pem(data)}).encode(),
        json.dumps({"identity": f"spiffe://{TD}/ns/a/sa/b", "csr": _pem(patched)}).encode(),
        json.dumps({"identity": data.decode("latin-1"), "csr": _pem(valid)}).encode(),
    ]
    for body in bodies:
        try:
            doc = _json_object(body)
            identity = signer.parse_identity(_field(doc, "identity", str))
            signer.check_csr(_field(doc, "csr", str).encode(), identity)
        except SignError as e:
            assert 400 <= e.status < 500, e


def mesh_config(data: bytes) -> None:
    """The mesh config's ext_authz providers (ConfigMap veil-system/veil-mesh): YAML text as
    given, and providers built from known field names and odd values; a provider is usable,
    unusable with a reason, or the whole config refused with ProviderError."""
    fdp = atheris.FuzzedDataProvider(data)
    docs = [fdp.ConsumeUnicodeNoSurrogates(256)]
    provider: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        key = fdp.PickValueInList([*sorted(extauthz.FIELDS), "includeRequestBodyInCheck"])
        provider[key] = _odd_value(fdp)
    docs.append(json.dumps({"extensionProviders": [{"name": "p", "envoyExtAuthzHttp": provider}]}))
    for text in docs:
        obj = {"kind": "ConfigMap", "data": {"mesh": text}}
        try:
            config = extauthz.parse_mesh_config(obj)
        except extauthz.ProviderError:
            continue
        for p in config.providers.values():
            req = extauthz.check_request(p, "GET", "/x", [("host", "h"), ("a", "b")])
            assert req.target.startswith(p.path_prefix)
            extauthz.verdict(p, 403, [("x", "y")], b"")


def _odd_value(fdp: Any) -> Any:
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        return fdp.ConsumeUnicodeNoSurrogates(24)
    if kind == 1:
        return fdp.ConsumeInt(4)
    if kind == 2:
        return [fdp.ConsumeUnicodeNoSurrogates(8) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 3:
        return {fdp.ConsumeUnicodeNoSurrogates(8): fdp.ConsumeUnicodeNoSurrogates(8)}
    if kind == 4:
        return fdp.ConsumeBool()
    return None


def h2_backend_answer(data: bytes) -> None:
    """The waypoint's HTTP/2 client to a backend (`H2Client`): any bytes as the backend's
    answer to one request; events or HboneError, never anything else."""

    class Backend:
        def __init__(self) -> None:
            self.chunks = [data[i : i + 97] for i in range(0, len(data), 97)]

        async def send(self, _: Any) -> None:
            await trio.lowlevel.checkpoint()

        async def receive(self) -> bytes:
            await trio.lowlevel.checkpoint()
            return self.chunks.pop(0) if self.chunks else b""

    async def run() -> None:
        client = H2Client(Backend())  # type: ignore[arg-type]
        req = h11.Request(method="POST", target="/s/m", headers=[("host", "h")])
        with contextlib.suppress(HboneError):
            await client.send(req)
            await client.send(h11.EndOfMessage())
            for _ in range(64):
                ev = await client.next_event()
                if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    break

    trio.run(run)


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
        ca_request,
        mesh_config,
        h2_backend_answer,
    )
}


def main() -> None:
    name, *flags = sys.argv[1:]
    atheris.Setup([sys.argv[0], *flags], HARNESSES[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
