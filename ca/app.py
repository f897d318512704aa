"""`veil ca` as a process: state source, signer, TLS API on 15012, metrics on 15014."""

from __future__ import annotations

import datetime
import logging

import trio

from veil.ca.auth import (
    Authenticators,
    BootstrapTokens,
    TokenReviewAuthenticator,
    lightkube_review,
)
from veil.ca.server import CaService
from veil.ca.signer import CaStorage, FileCaStorage, SecretCaStorage, Signer, load_or_create
from veil.core.csr import new_key
from veil.core.spiffe import SpiffeId
from veil.runtime import http
from veil.runtime.config import CaConfig
from veil.runtime.identity.tls import plain_server_context
from veil.runtime.lifecycle import run_until_signalled
from veil.runtime.sources import open_source
from veil.runtime.store import StateStore

log = logging.getLogger("veil.ca")


TRUST_CONFIGMAP = "veil-ca-root"


def build_service(cfg: CaConfig) -> tuple[CaService, StateStore]:
    storage: CaStorage = FileCaStorage(cfg.data_dir)
    if cfg.ca_secret is not None:  # Kubernetes: the root in a Secret, shared by replicas
        from veil.runtime.sources import kube_sync_client  # noqa: PLC0415

        assert cfg.kubeconfig is not None
        ns, _, name = cfg.ca_secret.partition("/")
        storage = SecretCaStorage(kube_sync_client(cfg.kubeconfig), ns, name)
    material = load_or_create(storage, cfg.trust_domain, cfg.plugin_certs)
    # The bundle agents and waypoints trust, published next to the CA's data (and, on
    # Kubernetes, as a ConfigMap beside the Secret).
    bundle = "".join(material.bundle_pem())
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (cfg.data_dir / "trust-bundle.pem").write_text(bundle)
    if cfg.ca_secret is not None:
        publish_bundle(cfg, bundle)
    signer = Signer(
        material, cfg.trust_domain, default_ttl=datetime.timedelta(seconds=cfg.ttl_seconds)
    )
    store = StateStore()
    review = None
    if cfg.kubeconfig is not None:  # on Kubernetes: projected tokens, checked by TokenReview
        from veil.runtime.sources import kube_client  # noqa: PLC0415

        ns, _, name = cfg.agent_account.partition("/")
        review = TokenReviewAuthenticator(
            lightkube_review(kube_client(cfg.kubeconfig)), (ns, name), cfg.trust_domain
        )
    auth = Authenticators(BootstrapTokens(cfg.node_tokens), review)
    if cfg.node_tokens is None and review is None:
        raise ValueError("no way to authenticate agents: give --node-tokens or --kubeconfig")
    return CaService(signer, auth, store), store


def publish_bundle(cfg: CaConfig, bundle: str) -> None:
    """The trust bundle as ConfigMap `veil-ca-root` (key root-cert.pem) in the CA's
    namespace, applied server-side: what the controller hands to waypoints."""
    from lightkube.codecs import from_dict  # noqa: PLC0415

    from veil.runtime.sources import kube_sync_client  # noqa: PLC0415

    assert cfg.kubeconfig is not None and cfg.ca_secret is not None
    ns = cfg.ca_secret.partition("/")[0]
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": TRUST_CONFIGMAP, "namespace": ns},
        "data": {"root-cert.pem": bundle},
    }
    kube_sync_client(cfg.kubeconfig).apply(from_dict(obj), field_manager="veil-ca", force=True)


async def run(cfg: CaConfig) -> None:
    service, store = build_service(cfg)
    signer = service.signer
    key = new_key()
    serving = signer.server_certificate(
        SpiffeId(cfg.trust_domain, "veil-system", "veil-ca"), [cfg.server_name, "veil-ca"], key
    )
    ctx = plain_server_context(serving.chain, key)

    async def start(nursery: trio.Nursery) -> None:
        await nursery.start(open_source(cfg.state_dir, cfg.kubeconfig).run, store)
        await nursery.start(
            lambda task_status: http.serve(
                service.handle, cfg.listen[0], cfg.listen[1], ctx, task_status=task_status
            )
        )
        await nursery.start(
            lambda task_status: http.serve(
                service.metrics_handler,
                cfg.metrics_listen[0],
                cfg.metrics_listen[1],
                task_status=task_status,
            )
        )
        root = signer.material.roots[0]
        log.info(
            "ca: serving on %s:%d (trust domain %s, root %s, %s), metrics on %s:%d",
            *cfg.listen,
            cfg.trust_domain,
            root.subject.rfc4514_string(),
            "plug-in intermediate" if signer.material.plugged else "self-signed",
            *cfg.metrics_listen,
        )

    await run_until_signalled("ca", start)
