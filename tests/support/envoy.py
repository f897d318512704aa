"""Envoy as an HBONE peer: configurations for both roles, and a process runner.

Client role: a tcp_proxy whose upstream is an HTTP/2 CONNECT tunnel over mutual TLS (what
Istio's waypoints and sidecars use to speak HBONE). Server role: an HTTP connection manager
that terminates CONNECT (`connect_matcher` + CONNECT upgrade) and forwards to a local app.
Both pin TLS 1.3, ALPN h2, and check the peer's SPIFFE URI SAN.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENVOY = str(Path(sys.executable).parent / "envoy")
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_c"
    "onnection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _tls_common(cert: Path, key: Path, root: Path, san: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(root)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def _endpoint(name: str, ip: str, port: int) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": ip, "port_value": port}}
                        }
                    }
                ]
            }
        ],
    }


def hbone_client(
    listen: tuple[str, int],
    server: tuple[str, int],
    authority: str,
    server_identity: str,
    cert: Path,
    key: Path,
    root: Path,
) -> dict[str, Any]:
    """Plain TCP in on `listen`, out as a CONNECT stream to `server` (an HBONE 15008)."""
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "plain_in",
                    "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": TCP_PROXY,
                                        "stat_prefix": "hbone_out",
                                        "cluster": "hbone",
                                        "tunneling_config": {"hostname": authority},
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "hbone",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": _endpoint("hbone", *server),
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": HTTP_OPTIONS,
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "initial_stream_window_size": 4194304,
                                    "initial_connection_window_size": 16777216,
                                }
                            },
                        }
                    },
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": UPSTREAM_TLS,
                            "common_tls_context": _tls_common(
                                cert, key, root, {"exact": server_identity}
                            ),
                        },
                    },
                }
            ],
        }
    }


def hbone_server(
    listen: tuple[str, int],
    app: tuple[str, int],
    trust_domain: str,
    cert: Path,
    key: Path,
    root: Path,
    admin_port: int | None = None,
    max_connection_s: int | None = None,
    access_log: Path | None = None,
) -> dict[str, Any]:
    """HBONE in on `listen` (mTLS, clients of the trust domain), each CONNECT to `app`; with
    `admin_port`, Envoy's admin API on 127.0.0.1 (its stats); with `max_connection_s`, Envoy
    drains each HBONE connection that old (GOAWAY, then a last GOAWAY a second later); with
    `access_log`, a JSON line per CONNECT: what the client sent, as Envoy read it."""
    hcm_options: dict[str, Any] = (
        {
            "common_http_protocol_options": {"max_connection_duration": f"{max_connection_s}s"},
            "drain_timeout": "1s",
        }
        if max_connection_s
        else {}
    )
    if access_log is not None:
        hcm_options["access_log"] = [_connect_log(access_log)]
    admin = (
        {
            "admin": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
            }
        }
        if admin_port
        else {}
    )
    return {
        **admin,
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone_in",
                    "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": DOWNSTREAM_TLS,
                                    "require_client_certificate": True,
                                    "common_tls_context": _tls_common(
                                        cert, key, root, {"prefix": f"spiffe://{trust_domain}/"}
                                    ),
                                },
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "hbone_in",
                                        **hcm_options,
                                        "codec_type": "HTTP2",
                                        "http2_protocol_options": {
                                            "allow_connect": True,
                                            "initial_stream_window_size": 4194304,
                                            "initial_connection_window_size": 16777216,
                                        },
                                        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"connect_matcher": {}},
                                                            "route": {
                                                                "cluster": "app",
                                                                "upgrade_configs": [
                                                                    {
                                                                        "upgrade_type": "CONNECT",
                                                                        "connect_config": {},
                                                                    }
                                                                ],
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": _endpoint("app", *app),
                }
            ],
        },
    }


def _connect_log(path: Path) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": FILE_LOG,
            "path": str(path),
            "log_format": {
                "json_format": {
                    "method": "%REQ(:METHOD)%",
                    "authority": "%REQ(:AUTHORITY)%",
                    "forwarded": "%REQ(FORWARDED)%",
                    "baggage": "%REQ(BAGGAGE)%",
                    "traceparent": "%REQ(TRACEPARENT)%",
                    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
                    "code": "%RESPONSE_CODE%",
                }
            },
        },
    }


class EnvoyProcess:
    """Envoy run inside a netns (via nsenter); `stop()` always, also when a test fails."""

    def __init__(self, netns_path: str, config: dict[str, Any], workdir: Path, name: str) -> None:
        self.config_file = workdir / f"{name}.json"
        self.config_file.write_text(json.dumps(config))
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net={netns_path}",
                ENVOY,
                "-c",
                str(self.config_file),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
                "--base-id",
                str(abs(hash(name)) % 10000),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

    def wait_started(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"envoy exited {self.proc.returncode}:\n" + self.log.read_text()[-3000:]
                )
            if "starting main dispatch loop" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError("envoy did not start:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
