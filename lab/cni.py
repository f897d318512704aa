"""A CNI runtime: runs a plugin chain per the CNI 1.0 spec, as containerd or CRI-O would.

The lab gives each pod its network the way a real node does: the plugins of Debian's
containernetworking-plugins (ptp with host-local IPAM) are executed with CNI_COMMAND,
CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in the environment and the
network configuration on stdin, inside the node's netns (the plugins' "host" side). Later
plugins in the chain get the previous result as `prevResult`; DEL runs the chain in reverse.
Building configurations is pure (`network_config`, `plugin_input`); `CniRuntime` does the exec.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from veil.lab import netns

CNI_VERSION = "1.0.0"
DEFAULT_CNI_PATH = ("/usr/lib/cni", "/opt/cni/bin")


class CniError(RuntimeError):
    """A plugin failed; the message is the plugin's own error (code, msg, details)."""


def network_config(
    *,
    name: str,
    subnet: str,
    gateway: str,
    range_start: str,
    data_dir: str,
    extra_plugins: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The lab's network configuration list: ptp + host-local, then any chained plugins."""
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "plugins": [
            {
                "type": "ptp",
                "mtu": 1500,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet, "rangeStart": range_start, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir,
                },
            },
            *extra_plugins,
        ],
    }


LOOPBACK_CONFIG: dict[str, Any] = {
    "cniVersion": CNI_VERSION,
    "name": "cni-loopback",
    "plugins": [{"type": "loopback"}],
}


def plugin_input(
    conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev_result: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What one plugin reads on stdin: its own config plus the list's name and version."""
    out = {**plugin, "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    if prev_result is not None:
        out["prevResult"] = prev_result
    return out


@dataclass(frozen=True)
class Attachment:
    """Who the network is for: one pod's netns, interface and identity."""

    container_id: str
    netns: str  # the pod netns name
    ifname: str = "eth0"
    args: Mapping[str, str] = field(default_factory=dict)  # CNI_ARGS, e.g. K8S_POD_NAME

    def env(self, command: str, cni_path: Sequence[str]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": self.container_id,
            "CNI_NETNS": str(netns.path(self.netns)),
            "CNI_IFNAME": self.ifname,
            "CNI_PATH": ":".join(cni_path),
        }
        if self.args:
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in self.args.items())
        return env


def result_ip(result: Mapping[str, Any]) -> IPv4Address:
    """The pod's IPv4 address from a CNI result."""
    for entry in result.get("ips", []):
        iface = IPv4Interface(entry["address"])
        return iface.ip
    raise CniError(f"the CNI result has no IP address: {json.dumps(result)}")


class CniRuntime:
    """Executes plugin chains inside a host netns (the lab node's)."""

    def __init__(
        self,
        host_netns: str,
        cni_path: Sequence[str] = DEFAULT_CNI_PATH,
        cache_dir: Path | None = None,
    ) -> None:
        self.host_netns = host_netns
        self.cni_path = tuple(cni_path)
        self.cache_dir = cache_dir

    def find(self, plugin_type: str) -> str:
        for d in self.cni_path:
            candidate = Path(d) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        raise CniError(
            f"CNI plugin {plugin_type!r} not found in {':'.join(self.cni_path)} "
            "(install containernetworking-plugins: make setup)"
        )

    def _exec(
        self,
        command: str,
        conflist: Mapping[str, Any],
        plugin: Mapping[str, Any],
        att: Attachment,
        prev: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        binary = self.find(str(plugin["type"]))
        stdin = json.dumps(plugin_input(conflist, plugin, prev))
        proc = netns.run(
            netns.nsenter_argv(self.host_netns, [binary]),
            input=stdin,
            env=att.env(command, self.cni_path),
            check=False,
        )
        if proc.returncode != 0:
            try:
                err = json.loads(proc.stdout)
                detail = f"{err.get('msg')} (code {err.get('code')})"
                if err.get("details"):
                    detail += f": {err['details']}"
            except (ValueError, AttributeError):
                detail = (proc.stdout + proc.stderr).strip()
            raise CniError(f"CNI {command} of {plugin['type']} for {att.netns} failed: {detail}")
        if command != "ADD":
            return dict(prev or {})
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise CniError(
                f"CNI ADD of {plugin['type']} printed no JSON result: {proc.stdout[:200]!r}"
            ) from None
        return result

    def add(self, conflist: Mapping[str, Any], att: Attachment) -> dict[str, Any]:
        """ADD through the whole chain; the final result is cached for DEL."""
        result: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            result = self._exec("ADD", conflist, plugin, att, result)
        assert result is not None, "a network configuration list needs at least one plugin"
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cache = self.cache_dir / f"{conflist['name']}-{att.container_id}-{att.ifname}.json"
            cache.write_text(json.dumps({"config": conflist, "result": result}))
        return result

    def delete(self, conflist: Mapping[str, Any], att: Attachment) -> None:
        """DEL in reverse order with the cached result; errors of every plugin are collected."""
        prev = None
        if self.cache_dir is not None:
            cache = self.cache_dir / f"{conflist['name']}-{att.container_id}-{att.ifname}.json"
            if cache.exists():
                prev = json.loads(cache.read_text())["result"]
                cache.unlink()
        errors = []
        for plugin in reversed(conflist["plugins"]):
            try:
                self._exec("DEL", conflist, plugin, att, prev)
            except CniError as e:
                errors.append(str(e))
        if errors:
            raise CniError("; ".join(errors))
