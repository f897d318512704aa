"""Kernel text the lab reads (/proc/net/tcp, mountinfo) and the state store's file rules."""

from veil.lab import store
from veil.lab.cgroups import parse_mountinfo
from veil.lab.netns import parse_proc_net_tcp

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0D01F40A:C350 0A01F40A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
"""

MOUNTINFO = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
35 33 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
"""


def test_listening_ports_only():
    assert parse_proc_net_tcp(PROC_NET_TCP) == {8080, 9090}


def test_cgroup2_mount_is_found_not_assumed():
    assert str(parse_mountinfo(MOUNTINFO)) == "/sys/fs/cgroup/unified"
    unified_only = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    assert str(parse_mountinfo(unified_only)) == "/sys/fs/cgroup"
    assert parse_mountinfo(MOUNTINFO.replace("cgroup2 cgroup2", "tmpfs tmpfs")) is None


def test_plural_and_paths(tmp_path):
    assert store.plural("Pod") == "pods"
    assert store.plural("AuthorizationPolicy") == "authorizationpolicies"
    assert store.plural("Gateway") == "gateways"
    assert store.plural("Ingress") == "ingresses"
    assert store.object_path(tmp_path, "Pod", "shop", "a") == tmp_path / "pods/shop/a.yaml"
    assert store.object_path(tmp_path, "Node", None, "n1") == tmp_path / "nodes/n1.yaml"


def test_objects_round_trip_and_temporary_files_are_skipped(tmp_path):
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "shop"},
        "status": {"podIP": "10.244.1.10"},
    }
    path = store.write_object(tmp_path, obj)
    (path.parent / ".a.yaml.tmp-123").write_text("half: [")
    assert list(store.read_objects(tmp_path)) == [obj]
    store.write_object(tmp_path, {**obj, "status": {"podIP": "10.244.1.11"}})
    assert [o["status"]["podIP"] for o in store.read_objects(tmp_path)] == ["10.244.1.11"]
    assert not list(tmp_path.rglob(".*.tmp-*"))[1:]  # only the one planted above
