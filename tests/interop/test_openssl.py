"""The agent's 15008 as OpenSSL's `s_client` (a TLS peer no one here wrote) finds it: TLS 1.3
only, and a client certificate required."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.lab import TD, lab_exec
from tests.support.pki import mesh_cert
from veil.core.spiffe import SpiffeId
from veil.lab import store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a real lab)")


def test_15008_speaks_tls_1_3_with_client_certificates_only(lab, pods, tmp_path):
    cert, key, root = mesh_cert(lab, "node2", SpiffeId(TD, "plain", "default"), tmp_path)
    target = f"{pods['server-b']['ip']}:15008"
    log = store.lab_dir(lab) / "logs" / "agent-node2.log"

    def s_client(*args: str) -> tuple[int, str]:
        argv = ["openssl", "s_client", "-connect", target, "-CAfile", str(root), "-alpn", "h2"]
        r = lab_exec(lab, "legacy", *argv, "-brief", *args, ns="plain", check=False)
        return r.returncode, r.stdout + r.stderr

    def logged(what: str) -> None:
        deadline = time.monotonic() + 5
        while what not in log.read_text():
            assert time.monotonic() < deadline, f"no '{what}' in {log.name}"
            time.sleep(0.1)

    code, out = s_client("-tls1_3", "-cert", str(cert), "-key", str(key))
    assert code == 0 and "Protocol version: TLSv1.3" in out, out

    code, out = s_client("-tls1_2", "-cert", str(cert), "-key", str(key))
    assert code != 0 and "protocol version" in out, out
    logged("failed: [SSL: UNSUPPORTED_PROTOCOL]")

    s_client("-tls1_3")  # no certificate: TLS 1.3 refuses it after the client's Finished
    logged("failed: [SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE]")
