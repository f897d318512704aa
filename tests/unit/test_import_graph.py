"""The layout's rules, read off the imports (issue 18): each role builds on the shared core and
runtime and never on another role; the core does no I/O; nothing in the product imports the
lab (only the `veil` command, which runs it, does); no two modules import each other in a
cycle (function-level imports included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
# top-level folder -> import name (src/veil links each folder into the `veil` package)
FOLDERS = {
    "core": "veil.core",
    "runtime": "veil.runtime",
    "agent": "veil.agent",
    "waypoint": "veil.waypoint",
    "ca": "veil.ca",
    "controller": "veil.controller",
    "lab": "veil.lab",
}
ROLES = ("veil.agent", "veil.waypoint", "veil.ca", "veil.controller")
SHARED = ("veil.core", "veil.runtime")
# The stdlib and third-party modules that mean I/O: none of them in the core.
IO_MODULES = {"trio", "ssl", "subprocess", "asyncio", "selectors", "pyroute2", "bcc"}
# `socket` is allowed for its address helpers (inet_pton) but never to make a socket.
IO_CALLS = re.compile(
    r"socket\.socket\(|create_connection\(|(?<![\w.])open\(|\.read_text\(|\.read_bytes\(|"
    r"\.write_text\(|\.write_bytes\(|os\.system\("
)


def modules() -> dict[str, Path]:
    out = {"veil": ROOT / "src" / "veil" / "__init__.py", "veil.cli": ROOT / "src/veil/cli.py"}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((pkg, *parts))] = path
    return out


def imported_names(path: Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    out = {}
    for m, p in mods.items():
        deps = set()
        for name in imported_names(p):
            mod = name
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod and mod != "veil":
                deps.add(mod)
        out[m] = deps - {m}
    return out


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_every_folder_is_linked_into_the_veil_package():
    for folder in FOLDERS:
        link = ROOT / "src" / "veil" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), folder
    import veil.core  # noqa: PLC0415

    assert Path(veil.core.__file__).resolve() == (ROOT / "core" / "__init__.py").resolve()


def test_nothing_in_the_product_imports_the_lab():
    offenders = {
        m: sorted(d for d in deps if within(d, "veil.lab"))
        for m, deps in graph().items()
        if not within(m, "veil.lab", "veil.cli")
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_roles_build_on_the_shared_core_and_runtime_only():
    """The agent, the waypoint and the CA never import each other's modules."""
    offenders = {}
    for m, deps in graph().items():
        role = next((r for r in ROLES if within(m, r)), None)
        if role:
            bad = sorted(d for d in deps if not within(d, role, *SHARED))
            if bad:
                offenders[m] = bad
    assert offenders == {}


def test_the_shared_layers_import_no_role():
    g = graph()
    offenders = {
        m: sorted(d for d in deps if not within(d, *SHARED))
        for m, deps in g.items()
        if within(m, *SHARED)
    }
    assert {m: d for m, d in offenders.items() if d} == {}
    runtime_in_core = {
        m: sorted(d for d in deps if within(d, "veil.runtime"))
        for m, deps in g.items()
        if within(m, "veil.core")
    }
    assert {m: d for m, d in runtime_in_core.items() if d} == {}


def test_the_core_does_no_io():
    mods = modules()
    offenders = {}
    for m, path in mods.items():
        if within(m, "veil.core"):
            io = {n.split(".")[0] for n in imported_names(path)} & IO_MODULES
            io |= set(IO_CALLS.findall(path.read_text()))
            if io:
                offenders[m] = sorted(io)
    assert offenders == {}


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


def test_no_test_imports_another_test_module():
    """Shared helpers live in tests/support; test modules and conftests import only that."""
    offenders = {}
    for path in (ROOT / "tests").rglob("*.py"):
        if "support" in path.parts:
            continue
        bad = sorted(
            n
            for n in imported_names(path)
            if n.startswith("tests.")
            and not n.startswith(("tests.support", "tests.fuzz.harnesses"))
        )
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


# Private names of other libraries the product sets on purpose, with the reason.
FOREIGN_PRIVATE_OK = {"logging._srcfile"}  # the logging docs' advice: skip caller lookup


def test_no_module_touches_another_modules_private_names():
    """`obj._name` only where `_name` is defined in the same module (a class and its
    friends in one file); every other owner is asked through its public methods (issue 18,
    item 5: the relay and the HBONE stream)."""
    offenders = []
    for m, path in modules().items():
        tree = ast.parse(path.read_text())
        defined = {
            n.name
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        defined |= {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
        }
        defined |= {
            t.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign | ast.AnnAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Attribute)
                and n.attr.startswith("_")
                and not n.attr.startswith("__")
                and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
                and n.attr not in defined
                and ast.unparse(n) not in FOREIGN_PRIVATE_OK
            ):
                offenders.append(f"{m}:{n.lineno}: {ast.unparse(n)}")
    assert offenders == []


def test_only_the_hbone_stream_changes_its_own_state():
    """The relay (agent/proxy/copy.py) once set `Stream.sink`, `draining`, `down_done`...
    itself; now it calls the stream's methods (`attach_sink`, `begin_drain`, `drained`)."""
    offenders = []
    for m, path in modules().items():
        if m == "veil.runtime.hbone.io":
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Store)
                and isinstance(n.value, ast.Name)
                and n.value.id == "stream"
            ):
                offenders.append(f"{m}:{n.lineno}: {ast.unparse(n)}")
    assert offenders == []


def test_the_demo_finds_its_examples():
    """The demo's example folders are found from its own place (they moved with lab/)."""
    from veil.lab import demo  # noqa: PLC0415

    for name in ("shop", "shop-waypoint", "shop-policies"):
        assert (demo.EXAMPLES / name).is_dir(), demo.EXAMPLES / name
