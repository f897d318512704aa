"""Metric families of several processes (an agent and its workers) exposed as one: what a
scrape of the agent sees is the node's total, as with a single process."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

Labels = tuple[tuple[str, str], ...]


def merge(families: Iterable[Metric]) -> list[Metric]:
    """Families of the same name as one, samples of the same name and labels added up.

    Every family an agent's processes share counts something per process (connections,
    bytes, refusals, handshakes in progress), so the node's value is the sum; a counter's
    `_created` timestamp is the earliest of them."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, Labels], float]] = {}
    for family in families:
        if family.name not in merged:
            merged[family.name] = Metric(
                family.name, family.documentation, family.type, family.unit
            )
            values[family.name] = {}
        into = values[family.name]
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if key not in into:
                into[key] = s.value
            elif s.name.endswith("_created"):
                into[key] = min(into[key], s.value)
            else:
                into[key] += s.value
    for name, family in merged.items():
        family.samples = [
            Sample(sample, dict(labels), value) for (sample, labels), value in values[name].items()
        ]
    return list(merged.values())


class Merged:
    """A registry-like view (`collect()`, as `generate_latest` wants) over a registry and
    the families other processes reported."""

    def __init__(self, own: CollectorRegistry, reported: Callable[[], Iterable[Metric]]) -> None:
        self.own, self.reported = own, reported

    def collect(self) -> Iterator[Metric]:
        yield from merge([*self.own.collect(), *self.reported()])
