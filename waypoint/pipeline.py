"""The waypoint's decisions, pure: what a CONNECT may reach, whether a TCP stream may pass,
and what to do with one HTTP request.

`plan()` runs a request through the pipeline (normalization, authentication,
authorization, route selection, traffic policy, the upstream request) and returns what the
I/O driver (`waypoint.exchange`) executes: a `Plan` (send upstream, with retries, timeouts
and mirrors), a `Redirect`, or a `Reply` of the waypoint's own (400, 401, 403, 404, 500...).
Nothing here awaits or touches a socket; randomness (weighted backends) is passed in.
Tested as tables in tests/unit/test_waypoint_pipeline.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import h11

from veil.core import extauthz, jwt
from veil.core.authz import Decision, Facts, HttpFacts, Policy, at_waypoint, custom_checks, decide
from veil.core.routes import (
    BackendRef,
    HeaderModifier,
    HttpRoute,
    RequestFacts,
    Rule,
    Selected,
    pick_backend,
    reference_granted,
    replace_path,
    routes_for_client,
    select,
)
from veil.core.spiffe import SpiffeId
from veil.core.state import MeshState, Service, Workload
from veil.core.traffic import RetryPolicy, TrafficPolicy
from veil.waypoint import http1, normalize
from veil.waypoint.normalize import BadTarget, PathNormalization

# -- where a stream may go -----------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """What a CONNECT addressed: a service port (VIP) or one pod."""

    authority: str
    service: Service | None
    port: int
    workload: Workload | None = None
    # The Services whose Service-targeted policies apply: the addressed one, or for a pod
    # addressed by IP every Service that selects it.
    policy_services: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        """Where the addressed Service (or pod) lives: its policies are there."""
        if self.service is not None:
            return self.service.namespace
        return self.workload.namespace if self.workload is not None else ""

    @property
    def services(self) -> tuple[str, ...]:
        if self.policy_services:
            return self.policy_services
        return (self.service.name,) if self.service is not None else ()


@dataclass(frozen=True)
class ThisWaypoint:
    """Who this waypoint is: what every decision is relative to."""

    namespace: str
    gateway: str
    trust_domain: str
    normalization: PathNormalization = normalize.DEFAULT


def destination(state: MeshState, me: ThisWaypoint, target: tuple[str, int]) -> Destination | str:
    """What a CONNECT may reach through this waypoint, or why not: a Service VIP whose
    traffic this waypoint takes, or a pod bound to it (its own `use-waypoint`, or a Service
    of its that uses this waypoint). Anything else would let a client carry its traffic
    under the waypoint's identity past policies that target that Service."""
    ours = (me.namespace, me.gateway)
    authority = f"{target[0]}:{target[1]}"
    hit = state.services_by_vip.get(target)
    if hit is not None:
        wp = state.service_waypoint(hit[0])
        if wp is None or (wp.namespace, wp.name) != ours:
            return f"service {hit[0].namespace}/{hit[0].name} is not served by this waypoint"
        return Destination(authority, hit[0], target[1])
    w = state.workloads_by_ip.get(target[0])
    if w is None:
        return f"unknown destination {authority}"
    own = state.workload_waypoint(w)
    served = any(
        (wp := state.service_waypoint(s)) is not None and (wp.namespace, wp.name) == ours
        for s in state.services_of(w)
    )
    if not served and (own is None or (own.namespace, own.name) != ours):
        return f"pod {w.key} is not served by this waypoint"
    names = tuple(s.name for s in state.services_of(w))  # all in the pod's namespace
    return Destination(authority, None, target[1], w, names)


@dataclass(frozen=True)
class Caller:
    """Who sent a stream: the original client's identity (its agent's tunnel) and address."""

    peer: SpiffeId
    ip: str  # from the tunnel's `forwarded` header; "" if unknown
    # A connection from outside the mesh that the destination pod's agent carried here
    # (`veil.dev/ingress-use-waypoint`): no identity of its own, judged as plaintext.
    plaintext: bool = False

    @property
    def principal(self) -> str | None:
        return None if self.plaintext else self.peer.istio_principal

    @property
    def namespace(self) -> str:
        """The client's namespace, for GAMMA's consumer routes ("" outside the mesh)."""
        return "" if self.plaintext else self.peer.namespace


def plaintext_ingress(
    state: MeshState, me: ThisWaypoint, dest: Destination, peer: SpiffeId
) -> str | None:
    """Why a CONNECT saying it carries a connection from outside the mesh may not: only the
    destination pod's own agent may say so (it alone holds that pod's identity), for a pod
    whose namespace or Service asks for it. None: judged as that plaintext client."""
    w = dest.workload
    if w is None:
        return "plaintext ingress must address the pod it arrived at"
    if peer != w.identity(me.trust_domain):
        return f"only the agent of {w.key} carries its plaintext ingress"
    if not state.ingress_uses_waypoint(w):
        return f"{w.key} takes no ingress through its waypoint (veil.dev/ingress-use-waypoint)"
    return None


def authorize(  # noqa: PLR0917
    state: MeshState,
    me: ThisWaypoint,
    dest: Destination,
    caller: Caller,
    http: HttpFacts | None,
    sni: str = "",
) -> Decision:
    """The policies targeting this waypoint (Gateway) or the addressed Service; `http` None
    judges a stream as TCP: an ALLOW rule with HTTP fields matches nothing and a DENY rule
    with HTTP fields is applied without them (Istio's TCP filter chain). `sni`: the TLS server
    name of a stream the waypoint relays without terminating it (`connection.sni`)."""
    f, scope = _judged(me, dest, caller, http, sni)
    return decide(state.policies.policies.values(), f, scope)


def _judged(
    me: ThisWaypoint, dest: Destination, caller: Caller, http: HttpFacts | None, sni: str = ""
) -> tuple[Facts, Callable[[Policy], bool]]:
    """What a waypoint's decision is about, and which policies are its."""
    f = Facts(
        source_ip=caller.ip or "0.0.0.0",
        destination_ip=dest.authority.rsplit(":", 1)[0],
        destination_port=dest.port,
        principal=caller.principal,
        destination_namespace=dest.namespace or me.namespace,
        http=http,
        waypoint=True,
        sni=sni,
    )
    return f, at_waypoint(me.namespace, me.gateway, dest.services, dest.namespace or None)


def tcp_denied(
    state: MeshState, me: ThisWaypoint, dest: Destination, caller: Caller, sni: str = ""
) -> str | None:
    """Why a non-HTTP stream is refused, or None if the policies allow it as TCP."""
    d = authorize(state, me, dest, caller, None, sni)
    return None if d.allowed else f"RBAC: access denied ({d.policy or '-'}: {d.reason})"


def tcp_backend(
    state: MeshState, dest: Destination, caller: Caller, rng: random.Random
) -> tuple[Service, int] | str | None:
    """Where a non-HTTP stream goes under a TCPRoute on the addressed Service port: (backend
    Service, its port), why it is refused, or None without a TCPRoute (the Service itself).
    Whose route applies is the HTTPRoute's rule (a consumer route for its own namespace's
    clients); among several, the oldest (then by name)."""
    svc = dest.service
    if svc is None:
        return None
    port_name = next((p.name for p in svc.ports if p.port == dest.port), "")
    attached = routes_for_client(
        state.tcp_routes, svc.namespace, svc.name, dest.port, caller.namespace, port_name
    )
    if not attached:
        return None
    route = min(attached, key=lambda r: (r.created, r.namespace, r.name))
    return backend_of(state, route, pick_backend(route.rules[0], rng))


def backend_of(
    state: MeshState, route: HttpRoute, ref: BackendRef | None
) -> tuple[Service, int] | str:
    """The Service and port a route's picked backendRef sends to, or why it cannot: no
    backend had weight, another namespace's Service without a ReferenceGrant there (unless it
    is the route's own parent), or a Service that does not exist."""
    if ref is None:
        return f"{route.kind} {route.key}: no backend with weight"
    if not reference_granted(
        state.reference_grants, route.namespace, ref.namespace, ref.name, route.parent_services
    ):
        return (
            f"{route.kind} {route.key}: backendRef {ref.namespace}/{ref.name} is in another "
            "namespace and no ReferenceGrant there permits it"
        )
    backend = state.service(ref.namespace, ref.name)
    if backend is None:
        return f"{route.kind} {route.key}: backend Service {ref.namespace}/{ref.name} is unknown"
    return backend, ref.port


# -- what to do with a request -------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """The waypoint answers itself (text/plain `why`); nothing goes upstream."""

    status: int
    flags: str  # Envoy's response flags, for the access log
    why: str
    path: str = ""  # the normalized path, once known
    route: str = ""  # the HTTPRoute that matched, if one did
    audited: tuple[str, ...] = ()  # AUDIT policies whose rules matched (recorded, not enforced)


@dataclass(frozen=True)
class Redirect:
    """A RequestRedirect filter's answer, after the traffic policies' limits."""

    status: int
    location: str
    path: str
    route: str
    limits: tuple[TrafficPolicy, ...] = ()
    audited: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A request to send upstream, and everything about how."""

    method: bytes
    target: bytes  # what the backend sees (JWT query parameter removed, path rewritten)
    headers: list[tuple[str, str]]  # end-to-end, new trace span, the rule's modifications
    path: str  # the normalized path, for the record
    traceparent: str
    backend: Service | None  # None: the pod the CONNECT addressed (`Destination.workload`)
    port: int  # the backend Service's port (or the pod's)
    route: str = ""
    policy: TrafficPolicy | None = None  # the addressed Service's (pool limits, outliers)
    limits: tuple[
        TrafficPolicy, ...
    ] = ()  # rate limits and faults: the route's, then the Service's
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=0))
    timeout: float = float("inf")  # the whole request (timeouts.request)
    backend_timeout: float = float("inf")  # each try (timeouts.backendRequest)
    mirrors: tuple[BackendRef, ...] = ()  # granted mirror backends
    response_headers: tuple[HeaderModifier, ...] = ()  # the rule's, then the backendRef's
    chunked: bool = False  # the request body is streamed with chunked encoding
    audited: tuple[str, ...] = ()  # AUDIT policies whose rules matched
    websocket: bool = False  # an HTTP/1.1 WebSocket upgrade: relayed as bytes after a 101
    http2: bool = False  # sent to the backend as HTTP/2 (h2c prior knowledge); see `speaks_http2`

    @property
    def replayable_length(self) -> int | None:
        """The body's Content-Length (0 without one), None when chunked."""
        if self.chunked:
            return None
        for n, v in self.headers:
            if n.lower() == "content-length":
                return int(v)
        return 0


@dataclass(frozen=True)
class Check:
    """CUSTOM policies select the request: their ext_authz providers are asked first (the
    I/O driver does), then the request is planned again with their verdicts (`approved`)."""

    checks: tuple[tuple[str, extauthz.ExtAuthzProvider, extauthz.CheckRequest], ...]
    path: str
    route: str = ""
    audited: tuple[str, ...] = ()


Outcome = Plan | Redirect | Reply | Check


def plan(
    state: MeshState,
    me: ThisWaypoint,
    dest: Destination,
    caller: Caller,
    req: h11.Request,
    *,
    rng: random.Random,
    remote_keys: jwt.RemoteKeys | None = None,
    approved: tuple[extauthz.Allowed, ...] | None = None,
) -> Outcome:
    """One request through the pipeline: normalize, authenticate, authorize (CUSTOM, DENY,
    ALLOW), route, apply traffic policy, build the upstream request. The AUDIT policies that
    matched go with the outcome, whatever it is (Istio: AUDIT never changes the decision).
    `approved`: the verdicts of the ext_authz providers a `Check` asked for."""
    audit: list[str] = []
    outcome = _plan(state, me, dest, caller, req, rng, audit, remote_keys, approved)
    if audit:
        return replace(outcome, audited=tuple(audit))
    return outcome


def _plan(  # noqa: PLR0917
    state: MeshState,
    me: ThisWaypoint,
    dest: Destination,
    caller: Caller,
    req: h11.Request,
    rng: random.Random,
    audit: list[str],
    remote_keys: jwt.RemoteKeys | None,
    approved: tuple[extauthz.Allowed, ...] | None,
) -> Outcome:
    method = req.method.decode("latin-1")
    raw = req.target.decode("latin-1")
    try:
        t = normalize.normalize_target(raw, me.normalization, method)
    except BadTarget as e:
        return Reply(400, "DPE", f"bad request target: {e}", raw)
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers]
    if t.authority is not None:  # absolute form: its authority is the Host (RFC 9112 3.2.2)
        headers = [("host", t.authority), *((n, v) for n, v in headers if n.lower() != "host")]
    path = target = t.target  # `path`: as normalized, for the record and messages
    facts = RequestFacts.of(method, target, headers)

    # authentication and authorization
    authn = [
        p
        for p in state.request_authentications
        if p.applies(me.namespace, me.gateway, dest.services, dest.namespace or None)
    ]
    try:
        who = jwt.authenticate(authn, facts.headers, facts.query, remote_keys) if authn else None
    except jwt.JwtError as e:
        return Reply(401, "UAEX", f"Jwt verification fails: {e}", path)
    host = facts.header("host") or dest.authority
    http = HttpFacts(
        facts.method,
        facts.path,
        normalize.normalize_authority(host),
        dict(facts.headers),
        who.principal if who else None,
        who.claims if who else {},
        remote_ip=caller.ip,  # the client pod's address, as its agent forwarded it
    )
    if approved is None and state.policies.has_custom:
        f, scope = _judged(me, dest, caller, http)
        customs = custom_checks(state.policies.policies.values(), f, scope)
        if customs:
            return _check(state, customs, method, target, headers, path)
    d = authorize(state, me, dest, caller, http)
    audit.extend(d.audited)
    if not d.allowed:
        why = f"RBAC: access denied ({d.policy or '-'}: {d.reason})"
        return Reply(403, "RBAC", why, path)
    if authn:
        headers, target = jwt.upstream_request(authn, who, headers, target)
    if approved:
        headers = extauthz.upstream_request(headers, approved)

    # route
    hit: Selected | None = None
    backend = dest.service
    port = dest.port  # without a route: the addressed Service port
    if dest.service is not None:
        svc = dest.service
        port_name = next((p.name for p in svc.ports if p.port == dest.port), "")
        attached = routes_for_client(
            state.routes, svc.namespace, svc.name, dest.port, caller.namespace, port_name
        )
        if attached:
            hit = select(attached, facts)
            if hit is None:
                return Reply(404, "NR", f"no HTTPRoute rule matches {method} {path}", path)
    route = hit.route.key if hit else ""
    service_policy = (
        state.traffic_policy("Service", dest.service.namespace, dest.service.name)
        if dest.service is not None
        else None
    )
    route_policy = (
        state.traffic_policy("HTTPRoute", hit.route.namespace, hit.route.name) if hit else None
    )
    limits = tuple(p for p in (route_policy, service_policy) if p is not None)
    rule: Rule | None = hit.rule if hit else None
    if rule is not None and rule.invalid:
        kind = hit.route.kind if hit else "HTTPRoute"
        return Reply(500, "NR", f"{kind} {route}: {rule.invalid}", path, route)
    if hit is not None and hit.rule.redirect is not None:
        return _redirect(hit, headers, target, path, route, limits, dest.port)
    picked: BackendRef | None = None
    if hit is not None:
        picked = pick_backend(hit.rule, rng)
        found = backend_of(state, hit.route, picked)
        if isinstance(found, str):
            return Reply(500, "NR", found, path, route)
        backend, port = found  # the port of the backendRef picked, never another rule's

    # the upstream request
    trace = http1.child_traceparent(headers)
    out = [(n, v) for n, v in http1.end_to_end(headers) if n.lower() != "traceparent"]
    out.append(("traceparent", trace))
    chunked = http1.is_chunked(headers)
    if chunked:  # streamed as it comes, re-chunked by h11
        out.append(("transfer-encoding", "chunked"))
    websocket = req.http_version == b"1.1" and http1.websocket_upgrade(headers)
    if websocket:  # hop-by-hop, but the backend must see the proposal to accept it
        out += http1.UPGRADE_HEADERS
    upstream_target = target.encode("latin-1")
    if hit is not None and rule is not None:
        if rule.request_headers is not None:
            out = rule.request_headers.apply(out)
        if picked is not None and picked.request_headers is not None:
            out = picked.request_headers.apply(out)
        if rule.rewrite is not None:
            if rule.rewrite.hostname:
                out = [
                    ("host", rule.rewrite.hostname),
                    *((n, v) for n, v in out if n.lower() != "host"),
                ]
            if rule.rewrite.path is not None:
                rpath, sep, query = target.partition("?")
                new = replace_path(rpath, rule.rewrite.path, hit.match)
                upstream_target = (new + sep + query).encode("latin-1")
    retry = (rule.retry if rule else None) or (service_policy.retry if service_policy else None)
    mirrors = tuple(
        m.backend
        for m in (rule.mirrors if rule is not None else ())
        if hit is not None
        and reference_granted(
            state.reference_grants,
            hit.route.namespace,
            m.backend.namespace,
            m.backend.name,
            hit.route.parent_services,
        )
        and (m.fraction >= 1 or rng.random() < m.fraction)
    )
    return Plan(
        method=req.method,
        target=upstream_target,
        headers=out,
        path=path,
        traceparent=trace,
        backend=backend,
        port=port,
        route=route,
        policy=service_policy,
        limits=limits,
        retry=retry or RetryPolicy(attempts=0),
        timeout=rule.timeout if rule and rule.timeout else float("inf"),
        backend_timeout=rule.backend_timeout if rule and rule.backend_timeout else float("inf"),
        mirrors=mirrors,
        response_headers=tuple(
            m
            for m in (
                rule.response_headers if rule else None,
                picked.response_headers if picked else None,
                *(HeaderModifier(add=a.downstream_headers) for a in approved or ()),
            )
            if m is not None
        ),
        chunked=chunked,
        websocket=websocket,
        http2=not websocket
        and speaks_http2(
            hit.route if hit else None, facts.header("content-type") or "", backend, port
        ),
    )


def speaks_http2(
    route: HttpRoute | None, content_type: str, backend: Service | None, port: int
) -> bool:
    """Whether the backend is sent HTTP/2: a GRPCRoute's request, any gRPC request (it cannot
    travel as HTTP/1.1: trailers), or a Service port whose appProtocol (or name) says so."""
    if route is not None and route.kind == "GRPCRoute":
        return True
    if content_type.startswith("application/grpc"):
        return True
    sport = next((p for p in backend.ports if p.port == port), None) if backend else None
    return sport is not None and sport.speaks_http2


def _check(  # noqa: PLR0917
    state: MeshState,
    customs: tuple[Policy, ...],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    path: str,
) -> Check | Reply:
    """What to ask each CUSTOM policy's provider; a provider the mesh config does not define
    (or cannot use) denies: nothing a policy would have checked passes unchecked."""
    checks = []
    config = state.mesh_config
    for p in customs:
        provider = config.providers.get(p.provider)
        if provider is None:
            why = (
                config.unusable.get(p.provider) or "not in the mesh config (veil-system/veil-mesh)"
            )
            return Reply(
                403, "UAEX", f"RBAC: access denied ({p.ref}: provider {p.provider}: {why})", path
            )
        checks.append((p.ref, provider, extauthz.check_request(provider, method, target, headers)))
    return Check(tuple(checks), path)


WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def _redirect(  # noqa: PLR0917
    hit: Selected,
    headers: list[tuple[str, str]],
    target: str,
    normalized: str,
    route: str,
    limits: tuple[TrafficPolicy, ...],
    listener_port: int,
) -> Redirect:
    """Gateway API's rules for the Location: without `port`, the scheme's well-known port
    when `scheme` is set, else the port the request came to (in the mesh, the Service port);
    80 for http and 443 for https are left out."""
    r = hit.rule.redirect
    assert r is not None
    host = {n.lower(): v for n, v in headers}.get("host", "").split(":")[0]
    path, sep, query = target.partition("?")
    if r.path is not None:
        path = replace_path(path, r.path, hit.match)
    scheme = r.scheme or "http"
    number = r.port or (WELL_KNOWN_PORTS.get(scheme, listener_port) if r.scheme else listener_port)
    port = "" if WELL_KNOWN_PORTS.get(scheme) == number else f":{number}"
    location = f"{scheme}://{r.hostname or host}{port}{path}{sep}{query}"
    return Redirect(r.status, location, normalized, route, limits)


def pick_endpoint(
    state: MeshState,
    service: Service,
    port: int,
    rng: random.Random,
    ejected: Callable[[str], bool] | None = None,
) -> tuple[Workload, int] | None:
    """A ready pod of a Service port (and its target port), avoiding endpoints (`ip:port`)
    that are `ejected` unless every one is (Envoy's panic threshold)."""
    sport = next((p for p in service.ports if p.port == port), None)
    endpoints = state.endpoints(service, sport) if sport else []
    if ejected is not None:
        healthy = [e for e in endpoints if not ejected(f"{e[0].ip}:{e[1]}")]
        endpoints = healthy or endpoints
    return rng.choice(endpoints) if endpoints else None
