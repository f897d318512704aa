"""iptables capture rules: golden output, idempotent install, exact removal (pure)."""

import os
from pathlib import Path

from veil.agent.capture import rules

GOLDEN = Path(__file__).parent / "golden"

SAVE_WITH_ONE_JUMP_TWICE = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:VEIL-PRERT - [0:0]
:VEIL-OUTPUT - [0:0]
-A PREROUTING -j VEIL-PRERT
-A OUTPUT -j VEIL-OUTPUT
-A OUTPUT -j VEIL-OUTPUT
-A OUTPUT -d 10.1.2.3/32 -j ACCEPT
COMMIT
"""


def test_install_on_a_clean_netns_matches_golden():
    script = rules.install_script("")
    golden = GOLDEN / "capture-install.rules"
    if os.environ.get("VEIL_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()


def test_install_adds_each_jump_exactly_once():
    facts = rules.parse_save(SAVE_WITH_ONE_JUMP_TWICE)
    assert facts.jumps[("nat", "OUTPUT", "VEIL-OUTPUT")] == 2
    script = rules.install_script(SAVE_WITH_ONE_JUMP_TWICE)
    nat = script.split("*nat")[1]
    assert nat.count("-D OUTPUT -j VEIL-OUTPUT") == 1  # the duplicate goes
    assert "-A OUTPUT -j VEIL-OUTPUT" not in nat and "-A PREROUTING -j VEIL-PRERT" not in nat
    assert "-A PREROUTING -j VEIL-PRERT" in script.split("*nat")[0]  # mangle had none


def test_remove_deletes_every_trace_and_nothing_else():
    script = rules.remove_script(SAVE_WITH_ONE_JUMP_TWICE)
    assert script is not None
    assert script.count("-D OUTPUT -j VEIL-OUTPUT") == 2
    assert "-X VEIL-PRERT" in script and "-X VEIL-OUTPUT" in script
    assert "10.1.2.3" not in script
    assert rules.remove_script("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") is None


def test_agent_traffic_and_probes_are_never_redirected():
    nat = rules.chain_rules()["nat"]
    redirects = [r for r in nat if "REDIRECT" in r]
    assert all("! --mark 0x539/0xfff" in r for r in redirects)
    assert any("169.254.7.127" in r and "ACCEPT" in r for r in nat)
    assert any("! --dport 15008" in r and "--to-ports 15006" in r for r in redirects)


def test_ipv6_install_on_a_clean_netns_matches_golden():
    script = rules.install_script("", rules.IPV6)
    golden = GOLDEN / "capture-install-ipv6.rules"
    if os.environ.get("VEIL_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()


IP6_SAVE_INSTALLED = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:VEIL-INPUT - [0:0]
:VEIL-OUTPUT - [0:0]
-A INPUT -j VEIL-INPUT
-A INPUT -s fd00::9/128 -j ACCEPT
-A OUTPUT -j VEIL-OUTPUT
-A VEIL-INPUT -i lo -j ACCEPT
-A VEIL-INPUT -p tcp -j REJECT --reject-with tcp-reset
-A VEIL-OUTPUT -o lo -j ACCEPT
-A VEIL-OUTPUT -p tcp -j REJECT --reject-with tcp-reset
COMMIT
"""


def test_ipv6_tcp_is_refused_both_ways_but_on_loopback():
    assert rules.ipv6_rules()["filter"] == [
        "-A VEIL-INPUT -i lo -j ACCEPT",
        "-A VEIL-INPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A VEIL-OUTPUT -o lo -j ACCEPT",
        "-A VEIL-OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
    ]


def test_ipv6_install_twice_adds_no_jump_and_remove_leaves_the_rest():
    again = rules.install_script(IP6_SAVE_INSTALLED, rules.IPV6)
    assert "-A INPUT -j VEIL-INPUT" not in again and "-D INPUT" not in again
    removal = rules.remove_script(IP6_SAVE_INSTALLED, rules.IPV6)
    assert removal is not None
    assert removal.splitlines() == [
        "*filter",
        "-D INPUT -j VEIL-INPUT",
        "-D OUTPUT -j VEIL-OUTPUT",
        "-F VEIL-INPUT",
        "-X VEIL-INPUT",
        "-F VEIL-OUTPUT",
        "-X VEIL-OUTPUT",
        "COMMIT",
    ]
    assert rules.remove_script("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", rules.IPV6) is None
