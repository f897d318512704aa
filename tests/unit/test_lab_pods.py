"""What the lab's kubelet makes of an API Pod (lab/pods.py), what its kube-proxy part makes of
Services and EndpointSlices, and how the agent finds a running pod by its cgroup: pure parts,
table-tested."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from veil.agent.podfinder import pod_of_cgroup
from veil.lab import pods
from veil.lab.kubelet import service_table

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "uid": UID,
            "labels": {"app": "web"},
        },
        "spec": {"nodeName": "node1", "serviceAccountName": "web", **spec},
    }


OBJECTS = {
    ("ConfigMap", "settings"): {"mode": "fast", "level": "3"},
    ("ConfigMap", "kube-root-ca.crt"): {"ca.crt": "PEM"},
    ("Secret", "creds"): {"password": "s3cret"},
}


def lookup(kind: str, name: str) -> dict[str, str] | None:
    return OBJECTS.get((kind, name))


@pytest.mark.parametrize(
    ("image", "repository", "veil"),
    [
        ("veil/echo", "veil/echo", True),
        ("ghcr.io/veil-dev/veil:0.1", "veil-dev/veil", True),
        ("localhost:5000/veil@sha256:abc", "veil", True),
        ("busybox", "busybox", False),
        ("docker.io/library/nginx:1.27", "library/nginx", False),
        ("veilish/thing", "veilish/thing", False),
    ],
)
def test_images_name_the_program(image, repository, veil):
    assert pods.image_repository(image) == repository
    assert pods.is_veil_image(image) is veil


def test_a_veil_image_without_command_runs_veil_with_its_args():
    c = {"name": "a", "image": "veil/agent", "args": ["agent", "--node", "$(NODE_NAME)", "$$x"]}
    assert pods.argv(c, {"NODE_NAME": "node1"}) == ["veil", "agent", "--node", "node1", "$x"]
    assert pods.argv({"name": "a", "image": "x", "command": ["$(NOPE)"]}, {}) == ["$(NOPE)"]


def test_another_image_must_give_its_command():
    with pytest.raises(pods.PodError, match="give the container a `command`") as e:
        pods.argv({"name": "a", "image": "nginx"}, {})
    assert e.value.reason == "CreateContainerError"


def test_the_environment_follows_the_downward_api_and_references():
    container = {
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {
                "name": "OPT",
                "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y", "optional": True}},
            },
            {"name": "URL", "value": "http://$(IP):80"},
        ],
    }
    env = pods.container_env(pod(), container, "10.244.1.7", "172.30.0.11", lookup, "/bin")
    assert env["NODE"] == "node1" and env["IP"] == "10.244.1.7" and env["APP"] == "web"
    assert env["PW"] == "s3cret" and env["CFG_mode"] == "fast" and "OPT" not in env
    assert env["URL"] == "http://10.244.1.7:80"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert env["POD_NAME"] == "web-1" and env["POD_NAMESPACE"] == "shop"  # as manifest mode


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}},
            "not found",
        ),
        (
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "k"}}},
            "no key",
        ),
        ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}, "not supported"),
        (
            {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            "only value",
        ),
    ],
)
def test_a_missing_reference_keeps_the_container_from_starting(var, message):
    with pytest.raises(pods.PodError, match=message) as e:
        pods.container_env(pod(), {"env": [var]}, "", "", lookup, "/bin")
    assert e.value.reason == "CreateContainerConfigError"


KUBE_API_ACCESS = {
    "name": "kube-api-access-x",
    "projected": {
        "defaultMode": 0o644,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                    ]
                }
            },
        ],
    },
}


def test_the_service_account_volume_the_admission_plugin_adds():
    p = pod(volumes=[KUBE_API_ACCESS, {"name": "scratch", "emptyDir": {}}])
    assert pods.token_specs(p) == [pods.TokenSpec("kube-api-access-x", "token", None, 3607)]
    vols = pods.volumes(p, lookup, {("kube-api-access-x", "token"): "jwt"}, ("10.0.0.1", "h"))
    files = vols[0].files or {}
    assert files["token"][0] == b"jwt"
    assert files["ca.crt"][0] == b"PEM"
    assert files["namespace"][0] == b"shop"
    assert vols[1].files == {}


def test_configmap_secret_and_host_path_volumes():
    p = pod(
        volumes=[
            {
                "name": "cfg",
                "configMap": {"name": "settings", "items": [{"key": "mode", "path": "m"}]},
            },
            {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o400}},
            {"name": "opt", "configMap": {"name": "absent", "optional": True}},
            {"name": "netns", "hostPath": {"path": "/run/netns", "type": "Directory"}},
        ]
    )
    cfg, sec, opt, host = pods.volumes(p, lookup, {}, ("", ""))
    assert cfg.files == {"m": (b"fast", 0o644)}
    assert sec.files == {"password": (b"s3cret", 0o400)}
    assert opt.files == {}
    assert (host.host_path, host.host_path_type) == ("/run/netns", "Directory")


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ({"name": "v", "configMap": {"name": "absent"}}, "configmap 'absent' not found"),
        ({"name": "v", "persistentVolumeClaim": {"claimName": "c"}}, "not supported"),
        ({"name": "v", "hostPath": {"path": "/x", "type": "BlockDevice"}}, "hostPath type"),
    ],
)
def test_a_volume_the_lab_cannot_provide_is_an_error(volume, message):
    with pytest.raises(pods.PodError, match=message):
        pods.volumes(pod(volumes=[volume]), lookup, {}, ("", ""))


def test_mounts_bind_volume_paths_and_keep_sub_paths_inside():
    c = {
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
            {"name": "cfg", "mountPath": "/etc/mode", "subPath": "m"},
        ]
    }
    assert pods.mounts(c, {"cfg": "/lab/v/cfg"}) == [
        pods.Mount("/lab/v/cfg", "/etc/app", True),
        pods.Mount("/lab/v/cfg/m", "/etc/mode", False),
    ]
    with pytest.raises(pods.PodError, match="leaves its volume"):
        pods.mounts(
            {"volumeMounts": [{"name": "cfg", "mountPath": "/x", "subPath": "../.."}]},
            {"cfg": "/v"},
        )
    with pytest.raises(pods.PodError, match="no such volume"):
        pods.mounts({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, {})


def _state(running: bool, ready: bool = False, code: int | None = None) -> pods.ContainerState:
    return pods.ContainerState("app", "veil/echo", running, ready, 0, "t", exit_code=code)


@pytest.mark.parametrize(
    ("policy", "containers", "started", "phase", "ready"),
    [
        ("Always", [_state(True, True)], True, "Running", "True"),
        ("Always", [_state(True, False)], True, "Running", "False"),
        ("Always", [_state(False, code=1)], True, "Running", "False"),  # about to restart
        ("Never", [_state(False, code=0)], True, "Succeeded", "False"),
        ("OnFailure", [_state(False, code=0)], True, "Succeeded", "False"),
        ("Never", [_state(False, code=2)], True, "Failed", "False"),
        ("Always", [_state(False)], False, "Pending", "False"),
    ],
)
def test_the_status_the_kubelet_reports(policy, containers, started, phase, ready):
    status = pods.pod_status(
        pod(restartPolicy=policy), "10.244.1.7", "172.30.0.11", "t0", containers, started
    )
    assert status["phase"] == phase
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == ready and conditions["PodScheduled"] == "True"
    assert status["podIP"] == "10.244.1.7" and status["hostIP"] == "172.30.0.11"


def test_a_waiting_container_says_why():
    waiting = pods.ContainerState(
        "app", "x", False, False, 0, None, waiting_reason="CreateContainerConfigError",
        waiting_message="configmap 'x' not found",
    )  # fmt: skip
    status = pods.pod_status(pod(), None, "h", "t0", [waiting], True)
    assert status["phase"] == "Pending" and "podIP" not in status
    state = status["containerStatuses"][0]["state"]
    assert state == {
        "waiting": {"reason": "CreateContainerConfigError", "message": "configmap 'x' not found"}
    }


def test_ready_ports_are_the_declared_ones_and_the_probes():
    c = {
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"port": "http"}},
    }
    assert pods.ready_ports(c) == {8080}
    assert pods.ready_ports({"readinessProbe": {"tcpSocket": {"port": 9000}}}) == {9000}
    assert pods.ready_ports({}) == set()


def _svc(name: str, ip: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "ports": ports, **spec},
    }


def _slice(service: str, port: int, endpoints: list[dict[str, Any]], name: str | None = None):
    return {
        "metadata": {
            "name": f"{service}-abc",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"name": name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def _ep(ip: str, pod_name: str, node: str, ready: bool = True) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": {"ready": ready},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "name": pod_name},
    }


def test_kube_proxy_programs_ready_endpoints_of_cluster_ip_services():
    services = [
        _svc("web", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": "http"}]),
        _svc("headless", "None", [{"port": 80}]),
        _svc("ext", "", [{"port": 80}], type="ExternalName"),
    ]
    slices = [
        _slice(
            "web",
            8080,
            [
                _ep("10.244.2.5", "web-b", "node2"),
                _ep("10.244.1.5", "web-a", "node1"),
                _ep("10.244.1.6", "web-c", "node1", ready=False),
            ],
            name="http",
        ),
        _slice("other", 1, [_ep("10.244.1.9", "x", "node1")]),
    ]
    ((svc, port, eps),) = service_table(services, slices)
    assert (svc.namespace, svc.name, svc.cluster_ip) == ("shop", "web", IPv4Address("10.96.0.10"))
    assert port.port == 80
    assert [(str(e.ip), e.port, e.pod, e.node) for e in eps] == [
        ("10.244.1.5", 8080, "web-a", "node1"),
        ("10.244.2.5", 8080, "web-b", "node2"),
    ]


@pytest.mark.parametrize(
    ("path", "found"),
    [
        (f"/veil/lab/pods/pod{UID}", (UID, f"/veil/lab/pods/pod{UID}")),
        (f"/kubepods/besteffort/pod{UID}/0123abcd", (UID, f"/kubepods/besteffort/pod{UID}")),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID.replace('-', '_')}.slice/cri-containerd-0123.scope",
            (
                UID,
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                f"{UID.replace('-', '_')}.slice",
            ),
        ),
        ("/system.slice/sshd.service", None),
        (f"/veil/lab/pods/pod{UID}x", None),
    ],
)
def test_the_agent_finds_a_pod_by_the_uid_in_its_cgroup(path, found):
    assert pod_of_cgroup(path) == found
