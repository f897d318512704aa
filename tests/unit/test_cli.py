"""`veil` command-line conventions (issue 18.8): options anywhere before `--`, as kubectl."""

from __future__ import annotations

import pytest

from veil import cli
from veil.lab import lab


@pytest.fixture
def ran(monkeypatch):
    calls: list[tuple[str, str | None, list[str]]] = []
    monkeypatch.setattr(
        lab, "exec_in_pod", lambda name, pod, ns, argv: calls.append((pod, ns, list(argv)))
    )
    return calls


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "exec", "-n", "shop", "client", "--", "curl", "-s", "x"],
        ["lab", "exec", "client", "-n", "shop", "--", "curl", "-s", "x"],  # was: ran `-n`
        ["lab", "exec", "client", "--name", "lab", "-n", "shop", "--", "curl", "-s", "x"],
    ],
)
def test_exec_takes_options_anywhere_before_the_command(ran, argv):
    assert cli.main(argv) == 0
    assert ran == [("client", "shop", ["curl", "-s", "x"])]


def test_a_command_after_double_dash_keeps_its_own_options(ran):
    assert cli.main(["lab", "exec", "client", "--", "sh", "-c", "echo -n -- x"]) == 0
    assert ran == [("client", None, ["sh", "-c", "echo -n -- x"])]


@pytest.mark.parametrize(
    "argv",
    [["lab", "exec", "client"], ["lab", "exec", "client", "--"], ["lab", "status", "--", "x"]],
)
def test_what_cannot_be_parsed_is_refused_clearly(ran, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and ran == []
    assert "--" in capsys.readouterr().err


AGENT = ["agent", "--node", "node1", "--state-dir", "/tmp/s", "--ca-root", "r", "--token-file", "t"]


def test_agent_options_become_its_config():
    args = cli.build_parser().parse_args(
        [*AGENT, "--cni-exclude-namespaces", " kube-system, veil-system ,,",
         "--cni-bin-dir", "/host/bin", "--cni-conf-dir", "/host/net.d",
         "--daemonset", "veil-system/veil-agent", "--drain", "12"]
    )  # fmt: skip
    cfg = cli.agent_config(args)
    assert cfg.cni_exclude_namespaces == ("kube-system", "veil-system")
    assert (cfg.daemonset, cfg.drain, cfg.handover_wait) == ("veil-system/veil-agent", 12.0, 20.0)


@pytest.mark.parametrize(
    "extra",
    [["--cni-bin-dir", "/b"], ["--daemonset", "no-slash"], ["--drain", "-1"]],
)
def test_bad_agent_options_are_refused(extra):
    with pytest.raises(ValueError):
        cli.agent_config(cli.build_parser().parse_args([*AGENT, *extra]))
