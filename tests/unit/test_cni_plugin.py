"""veil-cni end to end: the real C shim executed as a runtime would, against the agent's real
CNI socket (agent/cni/server.py + plugin.py), for every CNI command, bad input, an absent or
dying agent (issues 18.7, 21.3): the answers on stdout and the exit codes."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from veil.agent.cni import plugin, server, shim_path
from veil.agent.cni.plugin import SUPPORTED
from veil.agent.enrollment import EnrollError

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.12/24"}], "interfaces": []}
ENV = {"CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0", "CNI_NETNS": "/run/netns/x"}
SHIM = shim_path()


class FakeEnrollment:
    """What the agent's socket calls: records requests, answers with `refuse` or success."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.refuse: str | None = None
        self.pods: dict[str, Any] = {}

    async def cni_add(self, ns: str, name: str, netns: str, ip: str) -> bool:
        self.seen.append(
            {"command": "ADD", "namespace": ns, "name": name, "netns": netns, "ip": ip}
        )
        if self.refuse:
            raise EnrollError(self.refuse)
        return True

    async def cni_del(self, ns: str, name: str) -> None:
        self.seen.append({"command": "DEL", "namespace": ns, "name": name})


@pytest.fixture(scope="module")
def shim() -> Path:
    if not SHIM.exists():
        pytest.fail(f"{SHIM} is not built: make setup")
    return SHIM


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, FakeEnrollment]]:
    """The agent's real CNI socket (agent/cni/server.py) over a recording enrollment."""
    path = tmp_path / "cni.sock"
    enrollment = FakeEnrollment()
    ready = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    scope = trio.CancelScope()

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, enrollment, path)
                ready.set()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    assert ready.wait(5)
    yield str(path), enrollment
    token[0].run_sync_soon(scope.cancel)
    t.join(5)


def run(env: dict[str, str], stdin: str) -> tuple[int, str]:
    """Execute the real shim as a container runtime would."""
    proc = subprocess.run(
        [str(SHIM)], env=env, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    return proc.returncode, proc.stdout


def out(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(text)
    return doc


def conf(path: str | None, prev: Any = PREV, **extra: Any) -> str:
    doc: dict[str, Any] = {"cniVersion": "1.0.0", "name": "net", "type": "veil-cni", **extra}
    if path is not None:
        doc["agentSocket"] = path
    if prev is not None:
        doc["prevResult"] = prev
    return json.dumps(doc)


def test_version_is_answered_without_the_agent(shim):
    code, text = run({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "0.4.0"}')
    assert code == 0
    assert out(text) == {"cniVersion": "0.4.0", "supportedVersions": SUPPORTED}


def test_add_returns_the_previous_result_once_the_agent_enrolled(shim, agent):
    path, enrollment = agent
    code, text = run({**ENV, "CNI_COMMAND": "ADD"}, conf(path))
    assert (code, out(text)) == (0, PREV)
    assert enrollment.seen == [
        {
            "command": "ADD",
            "namespace": "shop",
            "name": "cart-0",
            "netns": "/run/netns/x",
            "ip": "10.244.1.12",
        }
    ]


def test_check_asks_the_agent_and_prints_nothing(shim, agent):
    path, _ = agent
    assert run({**ENV, "CNI_COMMAND": "CHECK"}, conf(path)) == (0, "")


def test_add_fails_with_try_again_when_the_agent_is_down(shim, tmp_path):
    code, text = run({**ENV, "CNI_COMMAND": "ADD"}, conf(str(tmp_path / "gone.sock")))
    assert code == 1
    err = out(text)
    assert err["code"] == 11 and "unreachable" in err["msg"]


def test_an_agent_that_dies_mid_answer_is_unreachable_not_success(shim, tmp_path):
    """A socket that accepts and closes without an answer (an agent killed mid-ADD)."""
    path = tmp_path / "dying.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()

    def close_one() -> None:
        conn, _ = srv.accept()
        conn.close()  # unread: the shim's further writes get EPIPE (no SIGPIPE death)

    t = threading.Thread(target=close_one, daemon=True)
    t.start()
    big = conf(str(path), padding="x" * 500_000)
    code, text = run({**ENV, "CNI_COMMAND": "ADD"}, big)
    t.join(5)
    srv.close()
    assert code == 1 and out(text)["code"] == 11


def test_add_fails_when_the_agent_refuses(shim, agent):
    path, enrollment = agent
    enrollment.refuse = "capture failed"
    code, text = run({**ENV, "CNI_COMMAND": "ADD"}, conf(path))
    assert code == 1 and out(text)["code"] == 11 and "capture failed" in out(text)["msg"]


def test_del_succeeds_even_when_the_agent_is_down(shim, tmp_path):
    assert run({**ENV, "CNI_COMMAND": "DEL"}, conf(str(tmp_path / "gone.sock"), prev=None)) == (
        0,
        "",
    )


def test_del_tells_the_agent(shim, agent):
    path, enrollment = agent
    assert run({**ENV, "CNI_COMMAND": "DEL"}, conf(path, prev=None)) == (0, "")
    assert enrollment.seen[0]["command"] == "DEL"


@pytest.mark.parametrize(
    ("env", "stdin", "code"),
    [
        ({"CNI_COMMAND": "ADD"}, "BROKEN", 6),
        ({**ENV, "CNI_COMMAND": "ADD"}, "AGENT", 7),  # not chained
        ({**ENV, "CNI_COMMAND": "ADD"}, "AGENT-V6", 7),  # no IPv4 in prevResult
        ({"CNI_COMMAND": "ADD", "CNI_ARGS": "IgnoreUnknown=1"}, "AGENT-OK", 7),  # no pod name
        ({**ENV, "CNI_COMMAND": "GC"}, "AGENT-OK", 4),  # not a command of our versions
    ],
)
def test_bad_input_is_refused_with_the_specs_codes(shim, agent, env, stdin, code):
    path, _ = agent
    stdin = {
        "BROKEN": f'{{"agentSocket": "{path}", not json',  # the shim reads only the socket
        "AGENT": conf(path, prev=None),
        "AGENT-V6": conf(path, prev={"ips": [{"address": "fd00::1/64"}]}),
        "AGENT-OK": conf(path),
    }[stdin]
    got, text = run(env, stdin)
    assert got == 1
    assert out(text)["code"] == code


@pytest.mark.parametrize(
    "body",
    [
        "1",  # found by tests/fuzz (cni_stdin): JSON that is not an object crashed the plugin
        "[]",
        '"x"',
        "[" * 10_000 + "]" * 10_000,
    ],
)
def test_configuration_that_is_not_an_object_is_refused(body):
    code, text = trio.run(server_answer, {"CNI_COMMAND": "ADD"}, body)
    assert code == 1 and out(text)["code"] == 6


async def server_answer(env: dict[str, str], body: str) -> tuple[int, str]:
    async def ask(req: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the agent must not be asked")

    return await plugin.answer(env, body, ask)


def test_a_previous_result_with_odd_ips_is_refused(shim, agent):
    path, _ = agent
    code, text = run(
        {**ENV, "CNI_COMMAND": "ADD"}, conf(path, prev={"ips": [1, "x", {"address": 7}]})
    )
    assert code == 1 and out(text)["code"] == 7


def test_excluded_namespaces_pass_through_without_the_agent(shim, tmp_path: Path):
    """`excludeNamespaces` (as Istio's CNI plugin has it): the mesh's own namespace starts
    before the agent can run, so its pods are never captured and never wait for it; any other
    pod still fails closed when the agent is away."""
    doc = {
        "cniVersion": "1.0.0",
        "agentSocket": str(tmp_path / "absent.sock"),
        "excludeNamespaces": ["veil-system", "kube-system"],
        "prevResult": PREV,
    }
    env = {**ENV, "CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAMESPACE=veil-system;K8S_POD_NAME=ca"}
    code, text = run(env, json.dumps(doc))
    assert code == 0 and out(text)["ips"] == PREV["ips"]
    assert run({**env, "CNI_COMMAND": "CHECK"}, json.dumps(doc)) == (0, "")
    assert run({**env, "CNI_COMMAND": "DEL"}, json.dumps(doc)) == (0, "")
    code, text = run({**ENV, "CNI_COMMAND": "ADD"}, json.dumps(doc))  # shop: fail closed
    assert code == 1 and out(text)["code"] == 11


def test_excluded_namespaces_are_not_enrolled_when_the_agent_runs(shim, agent):
    path, enrollment = agent
    env = {**ENV, "CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=d"}
    code, text = run(env, conf(path, excludeNamespaces=["kube-system"]))
    assert (code, out(text)) == (0, PREV)
    assert enrollment.seen == []


@pytest.mark.parametrize(
    "data",
    [b"", b"GET / HTTP/1.1\r\n\r\n", b"CNI/1\nCNI_COMMAND=ADD", b"CNI/1\nEVIL=1\n\n{}"],
)
def test_the_agent_refuses_requests_that_are_not_the_shims(data):
    with pytest.raises(server.BadRequest):
        server.parse_request(data)


def test_the_agent_parses_the_shims_request():
    env, body = server.parse_request(b"CNI/1\nCNI_COMMAND=ADD\nCNI_ARGS=a=b;c=d\n\n{}\n")
    assert env == {"CNI_COMMAND": "ADD", "CNI_ARGS": "a=b;c=d"}
    assert body == "{}\n"
    assert server.parse_request(b"CNI/1\n\n{}") == ({}, "{}")


@pytest.mark.parametrize(
    "stdin",
    [
        "",
        "{",
        '{"agentSocket": "',
        '{"agentSocket": "\\u0041"}',
        '{"agentSocket": 7, "excludeNamespaces": "shop"}',
        '{"excludeNamespaces": ["shop", ' + "[" * 100_000,
        '{"prevResult": ' + "{" * 50_000 + "}" * 50_000 + "}",
        '{"cniVersion": "' + "9" * 1000 + '"}',
        '{"agentSocket": "/' + "a" * 5000 + '"}',
        "\x00\xff" * 1000,
        '{"excludeNamespaces": ["shop"], "prevResult": [1]}',
    ],
)
def test_the_shim_survives_malformed_configuration(shim, stdin):
    """Whatever the runtime hands it, the shim answers a CNI error or passes a namespace it
    excludes, never crashes, and never lets a mesh pod through without the agent."""
    env = {**ENV, "CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=x"}
    proc = subprocess.run(
        [str(SHIM)], env=env, input=stdin.encode(errors="surrogateescape"),
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc  # no agent at the default socket: never a success
    assert json.loads(proc.stdout)["code"] in (7, 11)
