"""`veil-cni`'s run() for every CNI command, bad input and an absent agent (issue 18.7): the
plugin's answers on stdout and exit codes, against a real Unix socket."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from veil.agent.cni.plugin import SUPPORTED, run

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.12/24"}], "interfaces": []}
ENV = {"CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0", "CNI_NETNS": "/run/netns/x"}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
    """A stand-in for the agent's CNI socket: records requests, answers what `answers` holds."""
    path = str(tmp_path / "cni.sock")
    seen: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = [{"ok": True, "enrolled": True}]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    buf += conn.recv(65536)
                seen.append(json.loads(buf))
                conn.sendall(json.dumps(answers[0]).encode() + b"\n")

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield path, seen, answers
    stop.set()
    t.join()
    srv.close()


def conf(path: str | None, prev: Any = PREV, **extra: Any) -> str:
    doc: dict[str, Any] = {"cniVersion": "1.0.0", "name": "net", "type": "veil-cni", **extra}
    if path is not None:
        doc["agentSocket"] = path
    if prev is not None:
        doc["prevResult"] = prev
    return json.dumps(doc)


def out(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def test_version(capsys):
    assert run({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}') == 0
    assert out(capsys)["supportedVersions"] == SUPPORTED


def test_add_returns_the_previous_result_once_the_agent_enrolled(agent, capsys):
    path, seen, _ = agent
    assert run({**ENV, "CNI_COMMAND": "ADD"}, conf(path)) == 0
    assert out(capsys) == PREV
    assert seen == [
        {
            "command": "ADD",
            "namespace": "shop",
            "name": "cart-0",
            "netns": "/run/netns/x",
            "ip": "10.244.1.12",
        }
    ]


def test_check_asks_the_agent_and_prints_nothing(agent, capsys):
    path, seen, _ = agent
    assert run({**ENV, "CNI_COMMAND": "CHECK"}, conf(path)) == 0
    assert capsys.readouterr().out == "" and seen[0]["command"] == "CHECK"


def test_add_fails_with_try_again_when_the_agent_is_down(tmp_path, capsys):
    assert run({**ENV, "CNI_COMMAND": "ADD"}, conf(str(tmp_path / "gone.sock"))) == 1
    err = out(capsys)
    assert err["code"] == 11 and "unreachable" in err["msg"]


def test_add_fails_when_the_agent_refuses(agent, capsys):
    path, _, answers = agent
    answers[0] = {"ok": False, "error": "capture failed"}
    assert run({**ENV, "CNI_COMMAND": "ADD"}, conf(path)) == 1
    assert out(capsys)["code"] == 11


def test_del_succeeds_even_when_the_agent_is_down(tmp_path, capsys):
    assert run({**ENV, "CNI_COMMAND": "DEL"}, conf(str(tmp_path / "gone.sock"), prev=None)) == 0
    assert capsys.readouterr().out == ""


def test_del_tells_the_agent(agent):
    path, seen, _ = agent
    assert run({**ENV, "CNI_COMMAND": "DEL"}, conf(path, prev=None)) == 0
    assert seen[0]["command"] == "DEL"


@pytest.mark.parametrize(
    ("env", "stdin", "code"),
    [
        ({"CNI_COMMAND": "ADD"}, "{not json", 6),
        ({**ENV, "CNI_COMMAND": "ADD"}, conf(None), 7),  # no agentSocket
        ({**ENV, "CNI_COMMAND": "ADD"}, conf("/x", prev=None), 7),  # not chained
        ({**ENV, "CNI_COMMAND": "ADD"}, conf("/x", prev={"ips": [{"address": "fd00::1/64"}]}), 7),
        ({"CNI_COMMAND": "ADD", "CNI_ARGS": "IgnoreUnknown=1"}, conf("/x"), 7),  # no pod name
    ],
)
def test_bad_input_is_refused_with_the_specs_codes(env, stdin, code, capsys):
    assert run(env, stdin) == 1
    assert out(capsys)["code"] == code


@pytest.mark.parametrize(
    "stdin",
    [
        "1",  # found by tests/fuzz (cni_stdin): JSON that is not an object crashed the plugin
        "[]",
        '"x"',
        "[" * 10_000 + "]" * 10_000,
    ],
)
def test_configuration_that_is_not_an_object_is_refused(stdin, capsys):
    assert run({"CNI_COMMAND": "ADD"}, stdin) == 1
    assert out(capsys)["code"] == 6


def test_a_previous_result_with_odd_ips_is_refused(capsys):
    prev = {"ips": [1, "x", {"address": 7}]}
    assert run({**ENV, "CNI_COMMAND": "ADD"}, conf("/x", prev=prev)) == 1
    assert out(capsys)["code"] == 7


def test_excluded_namespaces_pass_through_without_the_agent(tmp_path: Path, capsys):
    """`excludeNamespaces` (as Istio's CNI plugin has it): the mesh's own namespace starts
    before the agent can run, so its pods are never captured and never wait for it; any other
    pod still fails closed when the agent is away."""
    conf = {
        "cniVersion": "1.0.0",
        "agentSocket": str(tmp_path / "absent.sock"),
        "excludeNamespaces": ["veil-system", "kube-system"],
        "prevResult": PREV,
    }
    env = {**ENV, "CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAMESPACE=veil-system;K8S_POD_NAME=ca"}
    assert run(env, json.dumps(conf)) == 0
    assert json.loads(capsys.readouterr().out)["ips"] == PREV["ips"]
    assert run({**env, "CNI_COMMAND": "DEL"}, json.dumps(conf)) == 0
    assert run({**ENV, "CNI_COMMAND": "ADD"}, json.dumps(conf)) == 1  # shop: fail closed
    assert json.loads(capsys.readouterr().out)["code"] == 11
