"""The kubernetes mode's PKI and command lines (pure parts of lab/kubernetes.py)."""

from __future__ import annotations

import base64
import ipaddress

import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.lab import kubernetes


def test_the_api_servers_certificate_names_every_way_it_is_reached():
    ca = kubernetes.new_ca()
    _, cert = kubernetes.issue(
        ca,
        "kube-apiserver",
        dns=["kubernetes.default.svc"],
        ips=["172.30.0.2", "10.96.0.1"],
        server=True,
    )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("172.30.0.2"),
        ipaddress.ip_address("10.96.0.1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca[1])


def test_a_nodes_client_certificate_is_its_kubernetes_user_and_group():
    ca = kubernetes.new_ca()
    _, cert = kubernetes.issue(ca, "system:node:node1", ["system:nodes"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_kubeconfig_carries_the_server_and_credentials_inline():
    doc = yaml.safe_load(kubernetes.kubeconfig("admin", b"CA", b"CERT", b"KEY"))
    cluster = doc["clusters"][0]["cluster"]
    assert cluster["server"] == "https://172.30.0.2:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    assert base64.b64decode(doc["users"][0]["user"]["client-key-data"]) == b"KEY"


def test_the_api_server_runs_with_node_and_rbac_authorization():
    argv = kubernetes.argvs("lab")
    api = argv["kube-apiserver"]
    assert "--authorization-mode=Node,RBAC" in api
    assert "--enable-admission-plugins=NodeRestriction" in api
    assert "--service-cluster-ip-range=10.96.0.0/16" in api
    assert any(a.startswith("--service-account-signing-key-file=") for a in api)
    assert "--listen-client-urls=http://127.0.0.1:2379" in argv["etcd"]  # loopback only
    assert "--use-service-account-credentials=true" in argv["kube-controller-manager"]
