"""The Kubernetes source's pure parts (its behaviour against the real API server is in
tests/integration/test_kubernetes.py)."""

from __future__ import annotations

import httpx2 as httpx
from lightkube.models.core_v1 import PodSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod

from veil.core.state import build_state
from veil.runtime.sources import kubernetes


def test_a_listed_item_becomes_an_object_the_state_reads():
    """List items carry no kind; the source names it, so the builder types the object."""
    pod = Pod(
        metadata=ObjectMeta(name="a", namespace="shop"),
        spec=PodSpec(containers=[], nodeName="node1"),
    )
    doc = kubernetes.as_object(kubernetes.KINDS[1], pod)
    assert (doc["apiVersion"], doc["kind"]) == ("v1", "Pod")
    state = build_state([doc], 1)
    assert [(w.namespace, w.name, w.node) for w in state.workloads] == [("shop", "a", "node1")]


def test_the_status_of_a_failed_call_is_read_from_either_error_kind():
    request = httpx.Request("GET", "https://api/apis/x/v1/gateways")
    missing = httpx.HTTPStatusError("404", request=request, response=httpx.Response(404))
    assert kubernetes.status_code(missing) == 404
    assert kubernetes.status_code(OSError("unreachable")) is None
