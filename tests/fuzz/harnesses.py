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
import io
import json
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from agent.authz import PolicyError, parse_policy
    from agent.cni.plugin import run as cni_run
    from agent.hbone.conn import (
        PREFACE,
        HboneConnection,
        HboneProtocolError,
        RequestReceived,
        check_request,
        decode_plain,
    )
    from waypoint import http1
    from waypoint.jwt import JwtError, parse_request_authentication
    from waypoint.normalize import BadTarget, PathNormalization, normalize_target
    from waypoint.resilience import PolicyError as TrafficPolicyError
    from waypoint.resilience import parse_traffic_policy
    from waypoint.routes import RouteError, parse_route

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


def _json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


def policies(data: bytes) -> None:
    doc = _json(data)
    if not isinstance(doc, dict):
        return
    for parse, errors in (
        (parse_policy, (PolicyError,)),
        (parse_route, (RouteError,)),
        (parse_traffic_policy, (TrafficPolicyError,)),
        (parse_request_authentication, (JwtError,)),
    ):
        with contextlib.suppress(*errors):
            parse(doc)


def cni_stdin(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    command = ["ADD", "DEL", "CHECK", "VERSION", ""][fdp.ConsumeIntInRange(0, 4)]
    env = {"CNI_COMMAND": command, "CNI_ARGS": fdp.ConsumeUnicodeNoSurrogates(64)}
    stdin = fdp.ConsumeUnicodeNoSurrogates(512)
    doc = _json(stdin.encode())
    if isinstance(doc, dict) and "agentSocket" in doc:  # no agent here: one that is absent
        doc["agentSocket"] = "/nonexistent/veil-fuzz.sock"
        stdin = json.dumps(doc)
    with contextlib.redirect_stdout(io.StringIO()):  # the plugin answers on stdout
        code = cni_run(env, stdin)
    if code not in (0, 1):
        raise AssertionError(f"exit code {code}")


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
    )
}


def main() -> None:
    name, *flags = sys.argv[1:]
    atheris.Setup([sys.argv[0], *flags], HARNESSES[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
