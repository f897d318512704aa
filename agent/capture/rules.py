"""The iptables and policy-routing rules of iptables capture mode (pure, golden-tested).

Install and remove are computed from the netns's current `iptables-save` output, so that
installing twice changes nothing and removing deletes exactly what install added (every
jump, then Veil's own chains), leaving whatever else the pod had untouched.

IPv4 is captured (`IPV4`). IPv6 is not supported yet, and an enrolled pod's IPv6 TCP would
leave uncaptured, in plaintext: `IPV6` (ip6tables) refuses it instead, both ways, with a reset
(loopback excepted). A dual-stack socket reaching IPv4 through a v4-mapped address is IPv4 on
the wire and captured like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from veil.core.ports import (
    AGENT_MARK,
    CONN_MARK,
    HBONE_PORT,
    INBOUND_PLAIN_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    PROBE_SOURCE,
    ROUTE_TABLE,
    RULE_PRIORITY,
)

CHAINS = {"mangle": ("VEIL-PRERT", "VEIL-OUTPUT"), "nat": ("VEIL-PRERT", "VEIL-OUTPUT")}
JUMPS = (("PREROUTING", "VEIL-PRERT"), ("OUTPUT", "VEIL-OUTPUT"))


def chain_rules() -> dict[str, list[str]]:
    """Veil's own chains, per table."""
    m, cm, mask = f"{AGENT_MARK:#x}", f"{CONN_MARK:#x}", f"{MARK_MASK:#x}"
    return {
        "mangle": [
            f"-A VEIL-PRERT -m mark --mark {m}/{mask} -j CONNMARK --set-xmark {cm}/{mask}",
            f"-A VEIL-OUTPUT -m connmark --mark {cm}/{mask} -j CONNMARK --restore-mark "
            "--nfmask 0xffffffff --ctmask 0xffffffff",
        ],
        "nat": [
            f"-A VEIL-PRERT -s {PROBE_SOURCE}/32 -p tcp -j ACCEPT",
            f"-A VEIL-PRERT ! -d 127.0.0.1/32 -p tcp ! --dport {HBONE_PORT} -m mark ! --mark "
            f"{m}/{mask} -j REDIRECT --to-ports {INBOUND_PLAIN_PORT}",
            f"-A VEIL-OUTPUT -d {PROBE_SOURCE}/32 -p tcp -j ACCEPT",
            f"-A VEIL-OUTPUT -p tcp -m mark --mark {cm}/{mask} -j ACCEPT",
            "-A VEIL-OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
            f"-A VEIL-OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {m}/{mask} -j REDIRECT "
            f"--to-ports {OUTBOUND_PORT}",
        ],
    }


def ipv6_rules() -> dict[str, list[str]]:
    """Fail closed for IPv6: no TCP in or out of the pod but over loopback."""
    return {
        "filter": [
            "-A VEIL-INPUT -i lo -j ACCEPT",
            "-A VEIL-INPUT -p tcp -j REJECT --reject-with tcp-reset",
            "-A VEIL-OUTPUT -o lo -j ACCEPT",
            "-A VEIL-OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        ]
    }


@dataclass(frozen=True)
class RuleSet:
    """One address family's capture: Veil's chains per table, the jumps into them, the rules."""

    chains: Mapping[str, tuple[str, ...]]
    jumps: tuple[tuple[str, str], ...]
    rules: Mapping[str, list[str]]


IPV4 = RuleSet(CHAINS, JUMPS, chain_rules())
IPV6 = RuleSet(
    {"filter": ("VEIL-INPUT", "VEIL-OUTPUT")},
    (("INPUT", "VEIL-INPUT"), ("OUTPUT", "VEIL-OUTPUT")),
    ipv6_rules(),
)


@dataclass(frozen=True)
class SaveFacts:
    """What an `iptables-save` output says about Veil's rules."""

    jumps: dict[tuple[str, str, str], int]  # (table, builtin chain, target) -> occurrences
    chains: frozenset[tuple[str, str]]  # (table, chain) that exist


def parse_save(text: str, jumps_of: tuple[tuple[str, str], ...] = JUMPS) -> SaveFacts:
    table = ""
    jumps: dict[tuple[str, str, str], int] = {}
    chains: set[tuple[str, str]] = set()
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            chains.add((table, line[1:].split()[0]))
        elif line.startswith("-A "):
            parts = line.split()
            for builtin, target in jumps_of:
                if parts[1:] == [builtin, "-j", target]:
                    key = (table, builtin, target)
                    jumps[key] = jumps.get(key, 0) + 1
    return SaveFacts(jumps=jumps, chains=frozenset(chains))


def install_script(current_save: str, rs: RuleSet = IPV4) -> str:
    """iptables-restore --noflush input that makes the capture rules present exactly once."""
    facts = parse_save(current_save, rs.jumps)
    out = []
    for table, rules in rs.rules.items():
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in rs.chains[table]]  # declaring a chain flushes it
        for builtin, target in rs.jumps:
            extra = facts.jumps.get((table, builtin, target), 0) - 1
            out += [f"-D {builtin} -j {target}"] * max(0, extra)
            if extra < 0:
                out.append(f"-A {builtin} -j {target}")
        out += rules
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def remove_script(current_save: str, rs: RuleSet = IPV4) -> str | None:
    """iptables-restore --noflush input that removes every trace of capture; None if clean."""
    facts = parse_save(current_save, rs.jumps)
    out = []
    for table, chains in rs.chains.items():
        lines = []
        for builtin, target in rs.jumps:
            lines += [f"-D {builtin} -j {target}"] * facts.jumps.get((table, builtin, target), 0)
        for c in chains:
            if (table, c) in facts.chains:
                lines += [f"-F {c}", f"-X {c}"]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else None


def route_commands() -> list[list[str]]:
    """ip(8) commands (idempotent) delivering replies of spoofed connections to the agent."""
    return [["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)]]


def rule_args() -> list[str]:
    return [
        "fwmark",
        f"{CONN_MARK:#x}/{MARK_MASK:#x}",
        "pref",
        str(RULE_PRIORITY),
        "lookup",
        str(ROUTE_TABLE),
    ]
