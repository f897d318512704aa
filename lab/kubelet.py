"""The lab as the kubelet of one node (kubernetes mode), with the node's own credentials
(`system:node:<node>`, so the API server's Node authorizer and NodeRestriction judge it as
they would a real kubelet): it registers the Node, keeps it Ready with a status heartbeat,
and renews the node's Lease, as the kubelet does every 10 s.

This is the first part of the lab's kubelet: running the pods bound to the node comes next
(issue 19, item 3). Runs as `python -m veil.lab.kubelet KUBECONFIG NODE IP POD_CIDR` in the
node's netns, under the lab's supervisor.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any

from lightkube import ApiError, Client, KubeConfig
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.core_v1 import NodeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Node

log = logging.getLogger("veil.lab.kubelet")
HEARTBEAT = 10.0  # seconds, the kubelet's nodeLeaseRenewIntervalFraction of 40 s
LEASE_SECONDS = 40
CAPACITY = {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_status(ip: str) -> dict[str, Any]:
    t = now()[:19] + "Z"
    return {
        "status": {
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "veil lab kubelet is posting ready status",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                }
            ],
            "nodeInfo": {
                "kubeletVersion": "v0.0.0-veil-lab",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "veil-lab://0",
                "kernelVersion": "",
                "osImage": "veil lab",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
    }


def register(client: Client, node: str, ip: str, pod_cidr: str) -> None:
    """Create the Node (or find it, after a restart) and post its status."""
    try:
        client.create(
            Node(
                metadata=ObjectMeta(
                    name=node,
                    labels={
                        "kubernetes.io/hostname": node,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                    },
                ),
                spec=NodeSpec(podCIDR=pod_cidr, podCIDRs=[pod_cidr]),
            )
        )
        log.info("node %s registered", node)
    except ApiError as e:
        if e.status.code != 409:
            raise
    client.patch(Node.Status, node, node_status(ip))


def renew(client: Client, node: str) -> None:
    """Renew the node's Lease in kube-node-lease (create it the first time)."""
    renewed = now()
    spec = {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renewed}
    try:
        client.patch(Lease, node, {"spec": spec}, namespace="kube-node-lease")
    except ApiError as e:
        if e.status.code != 404:
            raise
        client.create(
            Lease(
                metadata=ObjectMeta(name=node, namespace="kube-node-lease"),
                spec=LeaseSpec(
                    holderIdentity=node,
                    leaseDurationSeconds=LEASE_SECONDS,
                    renewTime=datetime.datetime.now(datetime.UTC),
                ),
            )
        )


def run(kubeconfig: str, node: str, ip: str, pod_cidr: str) -> None:
    client = Client(config=KubeConfig.from_file(kubeconfig), field_manager="veil-lab-kubelet")
    registered = False
    last_status = 0.0
    while True:
        try:
            if not registered:
                register(client, node, ip, pod_cidr)
                registered, last_status = True, time.monotonic()
            renew(client, node)
            if time.monotonic() - last_status >= 4 * HEARTBEAT:  # status every 40 s, as kubelet
                client.patch(Node.Status, node, node_status(ip))
                last_status = time.monotonic()
        except Exception as e:  # the API server restarting, a timeout: try again next beat
            log.warning("heartbeat of node %s failed: %s", node, e)
        time.sleep(HEARTBEAT)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if len(sys.argv) != 5:
        sys.exit("usage: python -m veil.lab.kubelet KUBECONFIG NODE IP POD_CIDR")
    run(*sys.argv[1:])


if __name__ == "__main__":
    main()
