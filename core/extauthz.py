"""External authorization over HTTP (Istio's `CUSTOM` action with an `envoyExtAuthzHttp`
extension provider), sans-IO: the mesh config's providers, the check request a waypoint
sends, and what the provider's answer means.

The mesh config is a ConfigMap `veil-mesh` in the root namespace (`veil-system`) whose key
`mesh` holds Istio's MeshConfig YAML; only `extensionProviders` is read, so Istio's
`extensionProviders` list pastes in unchanged. The check follows Envoy's HTTP ext_authz
service (as Istio configures it): the request's method, `pathPrefix` + its path, and only the
headers the provider names (plus Host, Method, Path, Content-Length and Authorization, as
Envoy sends always) go to the provider; a 200 allows and the upstream request gets the
provider's `headersToUpstreamOnAllow`; any other status denies, and the client gets that
status, the provider's body and its `headersToDownstreamOnDeny` (all of them when the list
is not given, as Envoy). A provider that cannot be asked denies with `statusOnError`
(403), unless it says `failOpen: true`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from veil.core.authz import ROOT_NAMESPACE
from veil.core.traffic import PolicyError, parse_duration

MESH_CONFIG = ("ConfigMap", ROOT_NAMESPACE, "veil-mesh")
ALWAYS_SENT = ("host", "authorization", "content-length")
BODY_LIMIT = 64 * 1024  # of a provider's answer
DEFAULT_TIMEOUT = 600.0  # Istio's default for envoyExtAuthzHttp
# What Veil reads of an envoyExtAuthzHttp provider; anything else refuses the provider (a
# field it would ignore could be one a policy's safety depends on).
FIELDS = {
    "service",
    "port",
    "pathPrefix",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestHeadersInCheck",
    "includeAdditionalHeadersInCheck",
    "headersToUpstreamOnAllow",
    "headersToDownstreamOnAllow",
    "headersToDownstreamOnDeny",
}


class ProviderError(ValueError):
    """A provider (or the mesh config) that cannot be used; the message says which field."""


@dataclass(frozen=True)
class HeaderPatterns:
    """Istio's header name patterns: exact, `prefix*` or `*suffix` (case-insensitive)."""

    patterns: tuple[str, ...]

    def matches(self, name: str) -> bool:
        n = name.lower()
        for pattern in self.patterns:
            p = pattern.lower()
            if p in ("*", n):
                return True
            if p.endswith("*") and n.startswith(p[:-1]):
                return True
            if p.startswith("*") and n.endswith(p[1:]):
                return True
        return False

    def pick(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(n, v) for n, v in headers if self.matches(n)]


@dataclass(frozen=True)
class ExtAuthzProvider:
    name: str
    namespace: str  # the Service's
    service: str
    port: int
    path_prefix: str = ""
    timeout: float = DEFAULT_TIMEOUT
    fail_open: bool = False
    status_on_error: int = 403
    include_headers: HeaderPatterns = HeaderPatterns(())
    additional_headers: tuple[tuple[str, str], ...] = ()
    to_upstream_on_allow: HeaderPatterns = HeaderPatterns(())
    to_downstream_on_allow: HeaderPatterns = HeaderPatterns(())
    to_downstream_on_deny: HeaderPatterns | None = None  # None: every header of the answer

    @property
    def address(self) -> str:
        return f"{self.service}.{self.namespace}:{self.port}"


def service_name(value: str, where: str) -> tuple[str, str]:
    """(namespace, name) of Istio's service field: `name.ns.svc.cluster.local`, `name.ns`
    or `ns/name`."""
    if "/" in value:
        ns, _, name = value.partition("/")
    else:
        parts = value.split(".")
        if len(parts) < 2 or (len(parts) > 2 and parts[2] != "svc"):
            raise ProviderError(f"{where}: {value!r} is not <name>.<namespace>[.svc.<domain>]")
        name, ns = parts[0], parts[1]
    if not name or not ns:
        raise ProviderError(f"{where}: {value!r} names no Service")
    return ns, name


def _patterns(v: Any, where: str) -> HeaderPatterns:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ProviderError(f"{where}: expected a list of header names")
    return HeaderPatterns(tuple(v))


def parse_provider(p: Mapping[str, Any], where: str) -> ExtAuthzProvider | None:
    """An envoyExtAuthzHttp provider; None for a provider of another type (tracing, logging,
    gRPC ext_authz: policies naming it are refused at use, never passed)."""
    name = p.get("name")
    if not isinstance(name, str) or not name:
        raise ProviderError(f"{where}.name: required")
    d = p.get("envoyExtAuthzHttp")
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ProviderError(f"{where}.envoyExtAuthzHttp: expected a mapping")
    at = f"{where}.envoyExtAuthzHttp"
    for key in d:
        if key not in FIELDS:
            raise ProviderError(f"{at}.{key}: not supported by Veil")
    if not isinstance(d.get("service"), str):
        raise ProviderError(f"{at}.service: required")
    ns, svc = service_name(d["service"], f"{at}.service")
    port = d.get("port")
    if isinstance(port, str) and port.isdigit():  # Istio's examples quote it
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProviderError(f"{at}.port: a port number is required")
    prefix = d.get("pathPrefix", "")
    if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
        raise ProviderError(f"{at}.pathPrefix: must start with /")
    try:
        timeout = parse_duration(d["timeout"], f"{at}.timeout") if "timeout" in d else None
    except PolicyError as e:
        raise ProviderError(str(e)) from None
    status = d.get("statusOnError", 403)
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or not 200 <= status <= 599:
        raise ProviderError(f"{at}.statusOnError: an HTTP status is required")
    fail_open = d.get("failOpen", False)
    if not isinstance(fail_open, bool):
        raise ProviderError(f"{at}.failOpen: true or false")
    extra = d.get("includeAdditionalHeadersInCheck") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise ProviderError(f"{at}.includeAdditionalHeadersInCheck: a map of strings")
    deny = d.get("headersToDownstreamOnDeny")
    return ExtAuthzProvider(
        name=name,
        namespace=ns,
        service=svc,
        port=port,
        path_prefix=prefix,
        timeout=timeout or DEFAULT_TIMEOUT,
        fail_open=fail_open,
        status_on_error=status,
        include_headers=_patterns(
            d.get("includeRequestHeadersInCheck") or [], f"{at}.includeRequestHeadersInCheck"
        ),
        additional_headers=tuple((str(k).lower(), v) for k, v in extra.items()),
        to_upstream_on_allow=_patterns(
            d.get("headersToUpstreamOnAllow") or [], f"{at}.headersToUpstreamOnAllow"
        ),
        to_downstream_on_allow=_patterns(
            d.get("headersToDownstreamOnAllow") or [], f"{at}.headersToDownstreamOnAllow"
        ),
        to_downstream_on_deny=(
            None if deny is None else _patterns(deny, f"{at}.headersToDownstreamOnDeny")
        ),
    )


@dataclass(frozen=True)
class MeshConfig:
    """What Veil reads of the mesh config: ext_authz providers, and the names of providers
    it cannot use, with why (a CUSTOM policy naming one denies)."""

    providers: Mapping[str, ExtAuthzProvider]
    unusable: Mapping[str, str]


EMPTY = MeshConfig({}, {})


def parse_mesh_config(obj: Mapping[str, Any]) -> MeshConfig:
    """The ConfigMap `veil-mesh`; ProviderError when its `mesh` key cannot be read at all."""
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise ProviderError("ConfigMap veil-system/veil-mesh: data: expected a mapping")
    try:
        mesh = yaml.safe_load(data.get("mesh") or "") or {}
    except yaml.YAMLError as e:
        raise ProviderError(f"ConfigMap veil-system/veil-mesh: data.mesh: not YAML: {e}") from None
    if not isinstance(mesh, dict):
        raise ProviderError("ConfigMap veil-system/veil-mesh: data.mesh: expected a mapping")
    raw = mesh.get("extensionProviders") or []
    if not isinstance(raw, list):
        raise ProviderError("ConfigMap veil-system/veil-mesh: extensionProviders: a list")
    providers: dict[str, ExtAuthzProvider] = {}
    unusable: dict[str, str] = {}
    for i, p in enumerate(raw):
        where = f"ConfigMap veil-system/veil-mesh: extensionProviders[{i}]"
        name = p.get("name") if isinstance(p, dict) else None
        try:
            if not isinstance(p, dict):
                raise ProviderError(f"{where}: expected a mapping")
            got = parse_provider(p, where)
            if got is None:
                unusable[str(name)] = f"{where}: only envoyExtAuthzHttp providers can decide"
            elif got.name in providers or got.name in unusable:
                raise ProviderError(f"{where}.name: {got.name!r} is defined twice")
            else:
                providers[got.name] = got
        except ProviderError as e:
            if isinstance(name, str):
                providers.pop(name, None)
                unusable[name] = str(e)
            else:
                unusable[f"[{i}]"] = str(e)
    return MeshConfig(providers, unusable)


# -- one check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]


def check_request(
    provider: ExtAuthzProvider, method: str, target: str, headers: Sequence[tuple[str, str]]
) -> CheckRequest:
    """What the waypoint sends the provider for one request (its body is not sent)."""
    sent = [
        (n.lower(), v)
        for n, v in headers
        if n.lower() in ALWAYS_SENT or provider.include_headers.matches(n)
    ]
    sent = [(n, v) for n, v in sent if n != "content-length"] + [("content-length", "0")]
    sent += list(provider.additional_headers)
    return CheckRequest(method, provider.path_prefix + target, sent)


@dataclass(frozen=True)
class Allowed:
    upstream_headers: tuple[tuple[str, str], ...]  # set on the request sent on
    downstream_headers: tuple[tuple[str, str], ...]  # added to the response to the client


@dataclass(frozen=True)
class Denied:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    why: str


HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te"}
)


def verdict(
    provider: ExtAuthzProvider, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> Allowed | Denied:
    """What the provider's answer means."""
    fields = [(n.lower(), v) for n, v in headers if n.lower() not in HOP]
    if status == 200:
        return Allowed(
            tuple(provider.to_upstream_on_allow.pick(fields)),
            tuple(provider.to_downstream_on_allow.pick(fields)),
        )
    deny = provider.to_downstream_on_deny
    shown = [(n, v) for n, v in fields if n != "host"] if deny is None else deny.pick(fields)
    why = f"denied by ext_authz provider {provider.name} ({status})"
    return Denied(status, tuple(shown), body[:BODY_LIMIT], why)


def unreachable(provider: ExtAuthzProvider, error: str) -> Allowed | Denied:
    """The provider could not be asked: denied with statusOnError, unless it fails open."""
    if provider.fail_open:
        return Allowed((), ())
    why = f"ext_authz provider {provider.name} unavailable: {error}"
    return Denied(provider.status_on_error, (), b"", why)


def upstream_request(
    headers: Sequence[tuple[str, str]], allowed: Iterable[Allowed]
) -> list[tuple[str, str]]:
    """The request sent on: each provider's headersToUpstreamOnAllow replace the same names."""
    out = list(headers)
    for a in allowed:
        names = {n for n, _ in a.upstream_headers}
        out = [(n, v) for n, v in out if n.lower() not in names] + list(a.upstream_headers)
    return out
