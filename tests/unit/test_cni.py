"""The CNI runtime's pure parts: what each plugin reads on stdin and in its environment."""

import pytest

from veil.lab.cni import (
    CNI_VERSION,
    Attachment,
    CniError,
    network_config,
    plugin_input,
    result_ip,
)


def test_network_config_is_ptp_with_host_local():
    conf = network_config(
        name="net",
        subnet="10.244.1.0/24",
        gateway="10.244.1.1",
        range_start="10.244.1.10",
        data_dir="/tmp/ipam",
    )
    assert conf["cniVersion"] == CNI_VERSION
    (ptp,) = conf["plugins"]
    assert ptp["type"] == "ptp"
    assert ptp["ipam"]["type"] == "host-local"
    assert ptp["ipam"]["ranges"] == [
        [{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.10", "gateway": "10.244.1.1"}]
    ]
    assert ptp["ipam"]["dataDir"] == "/tmp/ipam"


def test_chained_plugins_come_after_ptp():
    conf = network_config(
        name="net",
        subnet="10.244.1.0/24",
        gateway="10.244.1.1",
        range_start="10.244.1.10",
        data_dir="/d",
        extra_plugins=[{"type": "veil-cni", "socket": "/run/x.sock"}],
    )
    assert [p["type"] for p in conf["plugins"]] == ["ptp", "veil-cni"]


def test_plugin_input_carries_name_version_and_prev_result():
    conf = network_config(
        name="net",
        subnet="10.244.1.0/24",
        gateway="10.244.1.1",
        range_start="10.244.1.10",
        data_dir="/d",
        extra_plugins=[{"type": "next"}],
    )
    first = plugin_input(conf, conf["plugins"][0], None)
    assert first["name"] == "net" and first["cniVersion"] == CNI_VERSION
    assert "prevResult" not in first
    prev = {"cniVersion": CNI_VERSION, "ips": [{"address": "10.244.1.10/24"}]}
    second = plugin_input(conf, conf["plugins"][1], prev)
    assert second == {"type": "next", "name": "net", "cniVersion": CNI_VERSION, "prevResult": prev}


def test_attachment_environment_follows_the_spec():
    att = Attachment(
        "abc123", "veil-t-shop_a", args={"K8S_POD_NAME": "a", "K8S_POD_NAMESPACE": "shop"}
    )
    env = att.env("ADD", ["/usr/lib/cni", "/opt/cni/bin"])
    assert env["CNI_COMMAND"] == "ADD"
    assert env["CNI_CONTAINERID"] == "abc123"
    assert env["CNI_NETNS"] == "/run/netns/veil-t-shop_a"
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == "/usr/lib/cni:/opt/cni/bin"
    assert env["CNI_ARGS"] == "K8S_POD_NAME=a;K8S_POD_NAMESPACE=shop"


def test_result_ip():
    assert (
        str(result_ip({"ips": [{"address": "10.244.2.11/24", "gateway": "10.244.2.1"}]}))
        == "10.244.2.11"
    )
    with pytest.raises(CniError, match="no IP address"):
        result_ip({"ips": []})
