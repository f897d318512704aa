"""The lab's state directory: what the lab accepted, with status, as Kubernetes YAML.

The lab plays the API server and this directory is its etcd. Layout (documented in
docs/lab.md; the agent's ManifestSource watches `state/`):

    <root>/<lab>/lab.yaml                          the lab's own record (topology, netns, cgroup)
    <root>/<lab>/state/<plural>/<name>.yaml        cluster-scoped objects (namespaces, nodes)
    <root>/<lab>/state/<plural>/<ns>/<name>.yaml   namespaced objects, status included
    <root>/<lab>/{cni,ipam,logs}/                  CNI result cache, host-local IPAM, pod logs
    <root>/<lab>/nodes/<node>/                     per-node private files (credentials later)

Every file is written atomically (write a temporary file, then rename), so a reader sees the
old object or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_ROOT = Path("/run/veil/lab")
# libyaml's: the record and the state are read and written per pod during `lab up`, and the
# pure-Python ones made a 240-pod-per-node bring-up spend most of its time in YAML.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str) -> Any:
    return yaml.load(text, Loader=LOADER)


def root() -> Path:
    return Path(os.environ.get("VEIL_LAB_ROOT", str(DEFAULT_ROOT)))


def lab_dir(lab: str) -> Path:
    return root() / lab


def state_dir(lab: str) -> Path:
    return lab_dir(lab) / "state"


def plural(kind: str) -> str:
    k = kind.lower()
    if k.endswith("y") and not k.endswith(("ay", "ey", "oy")):
        return k[:-1] + "ies"
    if k.endswith(("s", "x", "ch", "sh")):
        return k + "es"
    return k + "s"


def object_path(state: Path, kind: str, namespace: str | None, name: str) -> Path:
    base = state / plural(kind)
    return (base / namespace / f"{name}.yaml") if namespace else base / f"{name}.yaml"


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def dump(obj: Mapping[str, Any]) -> str:
    return yaml.dump(dict(obj), Dumper=DUMPER, sort_keys=False, default_flow_style=False)


def write_object(state: Path, obj: Mapping[str, Any]) -> Path:
    md = obj["metadata"]
    path = object_path(state, obj["kind"], md.get("namespace"), md["name"])
    atomic_write(path, dump(obj))
    return path


def read_object(state: Path, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    path = object_path(state, kind, namespace, name)
    if not path.exists():
        return None
    doc = load(path.read_text())
    return doc if isinstance(doc, dict) else None


_TMP = re.compile(r"^\..*\.tmp-\d+$")


def read_objects(state: Path) -> Iterator[dict[str, Any]]:
    """Every object in a state directory, in path order (temporary files skipped)."""
    if not state.exists():
        return
    for path in sorted(state.rglob("*.yaml")):
        if _TMP.match(path.name):
            continue
        doc = load(path.read_text())
        if isinstance(doc, dict):
            yield doc


def read_record(lab: str) -> dict[str, Any] | None:
    path = lab_dir(lab) / "lab.yaml"
    if not path.exists():
        return None
    doc = load(path.read_text())
    return doc if isinstance(doc, dict) else None


_chart: dict[str, tuple[tuple[int, int], bool]] = {}


def chart_mode(lab: str) -> bool:
    """Whether the lab runs Veil from its Helm chart: its record's flag, read again only when
    the record changed (asked for every pod; the record grows with the pods)."""
    path = lab_dir(lab) / "lab.yaml"
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    key = (st.st_ino, st.st_mtime_ns)
    if (got := _chart.get(lab)) is None or got[0] != key:
        got = _chart[lab] = (key, bool((read_record(lab) or {}).get("chart")))
    return got[1]


def write_record(lab: str, record: Mapping[str, Any]) -> None:
    atomic_write(lab_dir(lab) / "lab.yaml", dump(record))


def labs() -> list[str]:
    r = root()
    return sorted(p.name for p in r.iterdir() if p.is_dir()) if r.exists() else []
