"""Manifest parsing: what the lab accepts, and errors that name file, object and field."""

from pathlib import Path

import pytest

from veil.lab.manifests import (
    Deployment,
    ManifestError,
    Object,
    Pod,
    Service,
    load_paths,
    parse_text,
)

EXAMPLES = Path(__file__).parents[2] / "examples" / "shop"

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, version: v1}}
    spec:
      containers:
        - name: app
          command: [veil, echo]
          args: [--port, "8080"]
          ports: [{name: http, containerPort: 8080}]
          env: [{name: GREETING, value: hi}]
"""


def test_shop_example_parses():
    objects = load_paths([EXAMPLES])
    kinds = {o.kind for o in objects}
    assert {"Namespace", "ServiceAccount", "Deployment", "Service", "Pod"} <= kinds
    namespaces = {o.meta.name for o in objects if o.kind == "Namespace"}
    assert len(namespaces) >= 2
    assert len([o for o in objects if isinstance(o, Service)]) >= 4


def test_deployment_fields():
    (d,) = parse_text(DEPLOYMENT, "web.yaml")
    assert isinstance(d, Deployment)
    assert d.replicas == 3
    assert d.selector == {"app": "web"}
    c = d.template.containers[0]
    assert c.command == ("veil", "echo", "--port", "8080")
    assert c.env == (("GREETING", "hi"),)
    assert c.ports[0].name == "http" and c.ports[0].container_port == 8080
    assert d.template.service_account == "default"


def test_unknown_kinds_are_kept_as_written():
    text = """
apiVersion: security.veil.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
"""
    (o,) = parse_text(text, "p.yaml")
    assert type(o) is Object
    assert o.raw["spec"] == {}
    assert o.ref == "AuthorizationPolicy shop/deny-all"


def test_namespace_defaults_to_default():
    (p,) = parse_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n"
        "spec: {containers: [{name: c, command: [sleep, '1']}]}\n",
        "p.yaml",
    )
    assert isinstance(p, Pod) and p.meta.namespace == "default"


def error_of(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as e:
        parse_text(text, "bad.yaml")
    return e.value


@pytest.mark.parametrize(
    ("mutation", "path", "words"),
    [
        (("replicas: 3", "replicas: three"), "spec.replicas", "expected an integer"),
        (("replicas: 3", "replicas: -1"), "spec.replicas", "0 or more"),
        (
            ("containerPort: 8080", "containerPort: 70000"),
            "spec.template.spec.containers[0].ports[0].containerPort",
            "outside 1-65535",
        ),
        (
            ("version: v1", "version: 1"),
            "spec.template.metadata.labels.version",
            "expected a string",
        ),
        (
            ('command: [veil, echo]\n          args: [--port, "8080"]', "command: []"),
            "spec.template.spec.containers[0].command",
            "give the container a command",
        ),
        (
            ("{app: web, version: v1}", "{version: v1}"),
            "spec.template.metadata.labels",
            "matchLabels",
        ),
        (("name: web", "name: Web_1"), "metadata.name", "not a valid"),
        (
            ("[{name: GREETING, value: hi}]", "[{value: hi}]"),
            "spec.template.spec.containers[0].env[0].name",
            "required field is missing",
        ),
    ],
)
def test_field_errors_name_file_object_and_field(mutation, path, words):
    old, new = mutation
    assert old in DEPLOYMENT
    err = error_of(DEPLOYMENT.replace(old, new))
    assert err.origin == "bad.yaml#1"
    assert err.path == path
    assert words in err.message
    assert str(err).startswith("bad.yaml#1: Deployment shop/")


def test_invalid_yaml_names_the_line():
    err = error_of("apiVersion: v1\nkind: Pod\nmetadata: {name: a\n")
    assert err.origin == "bad.yaml"
    assert "invalid YAML" in err.message
    assert "line" in err.obj


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("- a\n- b\n", "", "expected a Kubernetes object"),
        ("apiVersion: v1\nmetadata: {name: a}\n", "kind", "required"),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n",
            "metadata.namespace",
            "cluster-scoped",
        ),
        (
            "apiVersion: apps/v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n",
            "apiVersion",
            "needs apiVersion 'v1'",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
            "spec: {type: NodePort, ports: [{port: 80}]}\n",
            "spec.type",
            "ClusterIP",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
            "spec: {ports: [{port: 80}, {port: 81}]}\n",
            "spec.ports[0].name",
            "more than one",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
            "spec: {ports: [{port: 80, protocol: UDP}]}\n",
            "spec.ports[0].protocol",
            "TCP",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
            "spec: {ports: [{port: 80, targetPort: true}]}\n",
            "spec.ports[0].targetPort",
            "port number or name",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n",
            "spec.containers",
            "required",
        ),
    ],
)
def test_object_errors(text, path, words):
    err = error_of(text)
    assert err.path == path
    assert words in err.message


def test_duplicates_are_refused(tmp_path):
    doc = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"
    (tmp_path / "1.yaml").write_text(doc)
    (tmp_path / "2.yaml").write_text(doc)
    with pytest.raises(
        ManifestError,
        match=r"2.yaml#1: Namespace a: metadata.name: already "
        r"defined in .*1.yaml#1",
    ):
        load_paths([tmp_path])


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_paths([tmp_path / "nope"])
    with pytest.raises(ManifestError, match=r"no \.yaml files"):
        load_paths([tmp_path])
