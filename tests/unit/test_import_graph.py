"""The layout's rules, read off the imports (issue 18): nothing in the product imports the lab
(only the CLI, which runs it, does), the agent does not import the waypoint, and no two
modules import each other in a cycle (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("agent", "waypoint")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            mod = name
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod:
                found.add(mod)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) - {m} for m, p in mods.items()}


def test_nothing_in_the_product_imports_the_lab():
    offenders = {
        m: sorted(d for d in deps if d.startswith("agent.lab"))
        for m, deps in graph().items()
        if not m.startswith("agent.lab") and m != "agent.cli"
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_agent_does_not_import_the_waypoint():
    """The waypoint builds on the agent's modules, never the other way round (the CLI, which
    starts either, excepted)."""
    g = graph()
    offenders = {
        m: sorted(d for d in deps if d.startswith("waypoint"))
        for m, deps in g.items()
        if m.startswith("agent") and m != "agent.cli"
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycles():
    g = graph()
    # package __init__ modules import nothing of ours; a module "imports" its parent package
    # only implicitly, which is no cycle
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if seen.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(g):
        if m not in seen:
            visit(m)
    assert cycles == []
