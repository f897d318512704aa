"""HTTPRoute (gateway.networking.k8s.io/v1, GAMMA: parentRefs to a Service), pure.

`parse_route` turns an API object into an `HttpRoute` (RouteError names the field);
`select` picks the rule for a request with Gateway API's precedence; `pick_backend` makes the
weighted choice. No I/O: the waypoint feeds requests in and acts on what comes out.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from veil.core import regex
from veil.core.objects import refuse_odd_shapes
from veil.core.traffic import PolicyError, RetryPolicy, parse_duration, parse_retry

API_GROUP = "gateway.networking.k8s.io"


class RouteError(ValueError):
    """An HTTPRoute the waypoint cannot apply; the message names the route and field."""


@dataclass(frozen=True)
class PathMatch:
    type: str  # Exact | PathPrefix | RegularExpression
    value: str

    def matches(self, path: str) -> bool:
        if self.type == "Exact":
            return path == self.value
        if self.type == "PathPrefix":
            prefix = self.value.rstrip("/")
            return prefix in ("", path) or path.startswith(prefix + "/")
        return regex.fullmatch(self.value, path)


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match (names of headers compare case-insensitively)."""

    name: str
    value: str
    type: str = "Exact"  # Exact | RegularExpression

    def matches(self, got: str | None) -> bool:
        if got is None:
            return False
        return got == self.value if self.type == "Exact" else regex.fullmatch(self.value, got)


@dataclass(frozen=True)
class Match:
    path: PathMatch = PathMatch("PathPrefix", "/")
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def matches(self, req: RequestFacts) -> bool:
        return (
            self.path.matches(req.path)
            and (self.method is None or self.method == req.method)
            and all(h.matches(req.header(h.name)) for h in self.headers)
            and all(q.matches(req.query.get(q.name)) for q in self.query)
        )

    def precedence(self) -> tuple[int, int, int, int, int]:
        """Gateway API order: Exact path, then longest path, method, most headers, most query
        params (bigger sorts first)."""
        return (
            1 if self.path.type == "Exact" else 0,
            len(self.path.value),
            1 if self.method else 0,
            len(self.headers),
            len(self.query),
        )


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        return out + list(self.set) + list(self.add)


@dataclass(frozen=True)
class BackendRef:
    name: str  # a Service in the route's namespace (or `namespace`)
    namespace: str
    port: int
    weight: int = 1
    # The backendRef's own filters, applied when it is the one picked (after the rule's)
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None


@dataclass(frozen=True)
class Mirror:
    """RequestMirror: a copy of the request to `backend`, for `fraction` of requests."""

    backend: BackendRef
    fraction: float = 1.0


def _mirror_fraction(d: Mapping[str, Any], where: str) -> float:
    """`percent` (0-100) or `fraction` ({numerator, denominator: 100}), never both."""
    if "percent" in d and "fraction" in d:
        raise RouteError(f"{where}: percent and fraction exclude each other")
    if "percent" in d:
        percent = int(d["percent"])
        if not 0 <= percent <= 100:
            raise RouteError(f"{where}.percent: {percent} is outside 0-100")
        return percent / 100
    if "fraction" in d:
        f = d["fraction"]
        numerator, denominator = int(f["numerator"]), int(f.get("denominator", 100))
        if denominator <= 0 or not 0 <= numerator <= denominator:
            raise RouteError(
                f"{where}.fraction: needs 0 <= numerator <= denominator, 0 < denominator"
            )
        return numerator / denominator
    return 1.0


@dataclass(frozen=True)
class Redirect:
    """RequestRedirect: answered by the waypoint, never forwarded."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: tuple[str, str] | None = None  # (ReplaceFullPath|ReplacePrefixMatch, value)
    status: int = 302


@dataclass(frozen=True)
class Rewrite:
    """URLRewrite: the backend sees another Host and/or path."""

    hostname: str | None = None
    path: tuple[str, str] | None = None


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...] = (Match(),)
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    timeout: float | None = None  # timeouts.request: the whole exchange, body included
    backend_timeout: float | None = None  # timeouts.backendRequest: each try
    retry: RetryPolicy | None = None
    # Why this rule cannot be applied (an unsupported filter, a bad backendRef, ...): a
    # request it matches is answered 500, never sent on without it (Gateway API).
    invalid: str | None = None


def replace_path(path: str, how: tuple[str, str], match: Match) -> str:
    """A path filter's result: ReplaceFullPath, or ReplacePrefixMatch of the matched prefix."""
    kind, value = how
    if kind == "ReplaceFullPath" or match.path.type != "PathPrefix":
        return value
    prefix = match.path.value.rstrip("/")
    rest = path[len(prefix) :]
    if value.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    return (value + rest) or "/"


@dataclass(frozen=True)
class HttpRoute:
    namespace: str
    name: str
    # (namespace, Service, port or any, sectionName: the Service port's name, or any)
    parents: tuple[tuple[str, str, int | None, str | None], ...]
    rules: tuple[Rule, ...]
    created: str = ""  # creationTimestamp, for ties
    kind: str = "HTTPRoute"  # or GRPCRoute (sent to backends as gRPC), TCPRoute

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def parent_services(self) -> tuple[tuple[str, str], ...]:
        return tuple((ns, name) for ns, name, _, _ in self.parents)

    @property
    def problems(self) -> tuple[str, ...]:
        """Why some of its rules cannot be applied (those answer 500)."""
        return tuple(r.invalid for r in self.rules if r.invalid)

    def attaches_to(self, namespace: str, service: str, port: int, port_name: str = "") -> bool:
        """Whether a parentRef names this Service port: by `port`, by `sectionName` (the
        port's name, GAMMA), or the whole Service when it gives neither."""
        return any(
            ns == namespace
            and name == service
            and (p is None or p == port)
            and (section is None or section == port_name)
            for ns, name, p, section in self.parents
        )


@dataclass(frozen=True)
class RequestFacts:
    method: str
    path: str  # without the query string
    headers: Mapping[str, str]  # lower-case names
    query: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def of(method: str, target: str, headers: Iterable[tuple[str, str]]) -> RequestFacts:
        path, _, qs = target.partition("?")
        fields: dict[str, str] = {}
        for n, v in headers:
            name = n.lower()
            if name == "cookie" and name in fields:  # HTTP/2 splits cookies (RFC 9113 8.2.3)
                fields[name] += "; " + v
            else:
                fields[name] = v
        return RequestFacts(
            method=method.upper(),
            path=path or "/",
            headers=fields,
            query=dict(parse_qsl(qs, keep_blank_values=True)),
        )

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


# -- parsing -------------------------------------------------------------------------------


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise RouteError(f"{where}: expected a list")
    return v


def _values(items: Any, where: str) -> tuple[ValueMatch, ...]:
    out = []
    for i, m in enumerate(_list(items, where)):
        kind = m.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            raise RouteError(f"{where}[{i}].type: {kind!r} is not Exact or RegularExpression")
        if kind == "RegularExpression":
            _check_regex(m.get("value", ""), f"{where}[{i}].value")
        out.append(ValueMatch(str(m["name"]), str(m.get("value", "")), kind))
    return tuple(out)


def _check_regex(value: str, where: str) -> None:
    try:
        regex.compile_re2(value)
    except regex.RegexError as e:
        raise RouteError(f"{where}: {e}") from None


def _match(m: Mapping[str, Any], where: str) -> Match:
    path = m.get("path") or {}
    ptype = path.get("type", "PathPrefix")
    pvalue = str(path.get("value", "/"))
    if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
        raise RouteError(
            f"{where}.path.type: {ptype!r} is not Exact, PathPrefix or RegularExpression"
        )
    if ptype == "RegularExpression":
        _check_regex(pvalue, f"{where}.path.value")
    elif not pvalue.startswith("/"):
        raise RouteError(f"{where}.path.value: {pvalue!r} must start with /")
    method = m.get("method")
    return Match(
        path=PathMatch(ptype, pvalue),
        headers=_values(m.get("headers"), f"{where}.headers"),
        query=_values(m.get("queryParams"), f"{where}.queryParams"),
        method=str(method).upper() if method else None,
    )


def _modifier(f: Mapping[str, Any] | None) -> HeaderModifier | None:
    if not f:
        return None
    return HeaderModifier(
        set=tuple((str(h["name"]), str(h["value"])) for h in f.get("set") or []),
        add=tuple((str(h["name"]), str(h["value"])) for h in f.get("add") or []),
        remove=tuple(str(n) for n in f.get("remove") or []),
    )


SUPPORTED_FILTERS = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
)


def _path_filter(doc: Mapping[str, Any] | None, where: str) -> tuple[str, str] | None:
    if not doc:
        return None
    kind = doc.get("type")
    if kind == "ReplaceFullPath":
        return kind, str(doc["replaceFullPath"])
    if kind == "ReplacePrefixMatch":
        return kind, str(doc["replacePrefixMatch"])
    raise RouteError(f"{where}.type: {kind!r} is not ReplaceFullPath or ReplacePrefixMatch")


def _backend(b: Mapping[str, Any], ns: str, where: str) -> BackendRef:
    if b.get("kind", "Service") != "Service":
        raise RouteError(f"{where}.kind: only Service")
    if "port" not in b:
        raise RouteError(f"{where}.port: required for a Service")
    weight = int(b.get("weight", 1))
    if weight < 0:
        raise RouteError(f"{where}.weight: must not be negative")
    req_mod = resp_mod = None
    for j, f in enumerate(_list(b.get("filters"), f"{where}.filters")):
        ftype = f.get("type")
        if ftype == "RequestHeaderModifier":
            req_mod = _modifier(f.get("requestHeaderModifier"))
        elif ftype == "ResponseHeaderModifier":
            resp_mod = _modifier(f.get("responseHeaderModifier"))
        else:  # the rule answers 500 rather than send without it
            raise RouteError(
                f"{where}.filters[{j}].type: {ftype!r} is not supported on a backendRef "
                "(RequestHeaderModifier, ResponseHeaderModifier)"
            )
    return BackendRef(
        str(b["name"]), b.get("namespace", ns), int(b["port"]), weight, req_mod, resp_mod
    )


def _rule(
    r: Mapping[str, Any],
    rw: str,
    ns: str,
    matches: tuple[Match, ...],
    supported: tuple[str, ...],
) -> Rule:
    """A rule's filters, backends, timeouts and retry; RouteError names what it cannot apply."""
    req_mod = resp_mod = None
    redirect = rewrite = None
    mirrors = []
    for j, f in enumerate(_list(r.get("filters"), f"{rw}.filters")):
        ftype, fw = f.get("type"), f"{rw}.filters[{j}]"
        if ftype not in supported:
            raise RouteError(f"{fw}.type: {ftype!r} is not supported yet ({', '.join(supported)})")
        if ftype == "RequestHeaderModifier":
            req_mod = _modifier(f.get("requestHeaderModifier"))
        elif ftype == "ResponseHeaderModifier":
            resp_mod = _modifier(f.get("responseHeaderModifier"))
        elif ftype == "RequestRedirect":
            d = f.get("requestRedirect") or {}
            status = int(d.get("statusCode", 302))
            if status not in (301, 302, 303, 307, 308):
                raise RouteError(f"{fw}.requestRedirect.statusCode: {status}")
            redirect = Redirect(
                d.get("scheme"),
                d.get("hostname"),
                int(d["port"]) if "port" in d else None,
                _path_filter(d.get("path"), f"{fw}.requestRedirect.path"),
                status,
            )
        elif ftype == "URLRewrite":
            d = f.get("urlRewrite") or {}
            rewrite = Rewrite(
                d.get("hostname"), _path_filter(d.get("path"), f"{fw}.urlRewrite.path")
            )
        else:  # RequestMirror
            d = f.get("requestMirror") or {}
            mirrors.append(
                Mirror(
                    _backend(d.get("backendRef") or {}, ns, f"{fw}.requestMirror.backendRef"),
                    _mirror_fraction(d, f"{fw}.requestMirror"),
                )
            )
    backends = [
        _backend(b, ns, f"{rw}.backendRefs[{j}]")
        for j, b in enumerate(_list(r.get("backendRefs"), f"{rw}.backendRefs"))
    ]
    if redirect is not None and rewrite is not None:
        raise RouteError(f"{rw}.filters: RequestRedirect and URLRewrite exclude each other")
    t = r.get("timeouts") or {}
    try:
        timeout = parse_duration(t["request"], f"{rw}.timeouts.request") if "request" in t else None
        backend_timeout = (
            parse_duration(t["backendRequest"], f"{rw}.timeouts.backendRequest")
            if "backendRequest" in t
            else None
        )
        retry = parse_retry(r.get("retry"), f"{rw}.retry")
    except PolicyError as e:
        raise RouteError(str(e)) from None
    return Rule(
        matches,
        tuple(backends),
        req_mod,
        resp_mod,
        redirect,
        rewrite,
        tuple(mirrors),
        timeout,
        backend_timeout,
        retry,
    )


def parse_route(obj: Mapping[str, Any]) -> HttpRoute:
    md = obj.get("metadata") or {}
    ns, name = md.get("namespace", "default"), md.get("name", "?")
    spec = obj.get("spec") or {}
    route_kind = str(obj.get("kind") or "HTTPRoute")
    where = f"{route_kind} {ns}/{name}: spec"
    filters = GRPC_FILTERS if route_kind == "GRPCRoute" else SUPPORTED_FILTERS
    try:
        parents = []
        for i, p in enumerate(_list(spec.get("parentRefs"), f"{where}.parentRefs")):
            kind, group = p.get("kind", "Gateway"), p.get("group", API_GROUP)
            if kind == "Service" and group in ("", "core"):
                section = p.get("sectionName")
                parents.append(
                    (
                        p.get("namespace", ns),
                        str(p["name"]),
                        p.get("port"),
                        None if section is None else str(section),
                    )
                )
            elif kind != "Gateway":
                raise RouteError(f"{where}.parentRefs[{i}]: {group}/{kind} is not a core Service")
        rules = []
        for i, r in enumerate(_list(spec.get("rules"), f"{where}.rules") or [{}]):
            rw = f"{where}.rules[{i}]"
            matches = tuple(
                _match(m, f"{rw}.matches[{j}]")
                for j, m in enumerate(_list(r.get("matches"), f"{rw}.matches"))
            ) or (Match(),)
            try:
                rules.append(_rule(r, rw, ns, matches, filters))
            except (RouteError, KeyError, TypeError, ValueError, AttributeError) as e:
                why = str(e) if isinstance(e, RouteError) else f"{rw}: cannot read: {e!r}"
                rules.append(Rule(matches, invalid=why))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, RouteError):
            raise
        raise RouteError(f"{where}: cannot read: {e!r}") from None
    return HttpRoute(
        ns,
        name,
        tuple((a, b, int(c) if c is not None else None, d) for a, b, c, d in parents),
        tuple(rules),
        str(md.get("creationTimestamp", "")),
        route_kind,
    )


TCP_ROUTE_KINDS = ("TCPRoute",)
HTTP_ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


def parse_http_kind(obj: Mapping[str, Any]) -> HttpRoute:
    """An HTTPRoute or a GRPCRoute."""
    return parse_grpc_route(obj) if obj.get("kind") == "GRPCRoute" else parse_route(obj)


def _odd_shape(kind: str) -> Callable[[str, Exception], RouteError]:
    return lambda ref, e: RouteError(f"{kind} {ref}: spec: cannot read: {e!r}")


@refuse_odd_shapes(RouteError, _odd_shape("TCPRoute"))
def parse_tcp_route(obj: Mapping[str, Any]) -> HttpRoute:
    """A TCPRoute (gateway.networking.k8s.io/v1) on a Service port, GAMMA style: one rule
    whose weighted backendRefs take the port's non-HTTP connections at the waypoint. Kept as
    an HttpRoute with one match-all rule, so whose route applies (producer or consumer) and
    the weighted choice are the HTTPRoute's. More than one rule is refused: a TCP connection
    has nothing to match them on."""
    md = obj.get("metadata") or {}
    ns, name = md.get("namespace", "default"), md.get("name", "?")
    where = f"TCPRoute {ns}/{name}: spec"
    spec = obj.get("spec") or {}
    rules = _list(spec.get("rules"), f"{where}.rules")
    if len(rules) != 1:
        raise RouteError(f"{where}.rules: exactly one rule (a TCP connection has nothing to match)")
    for j, b in enumerate(_list(rules[0].get("backendRefs"), f"{where}.rules[0].backendRefs")):
        if b.get("filters"):
            raise RouteError(f"{where}.rules[0].backendRefs[{j}].filters: none on a TCPRoute")
    doc = {
        "kind": "TCPRoute",
        "metadata": md,
        "spec": {"parentRefs": spec.get("parentRefs"), "rules": rules},
    }
    route = parse_route(doc)
    if route.problems:
        raise RouteError("; ".join(route.problems))
    return route


GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")
GRPC_NAME = r"[^/]+"  # a gRPC service or method name: one path segment


def _grpc_match(m: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A GRPCRouteMatch as the HTTPRouteMatch it means: a gRPC call is a POST to
    `/<service>/<method>`, its metadata are headers."""
    out: dict[str, Any] = {}
    method = m.get("method")
    if method is not None:
        if not isinstance(method, Mapping):
            raise RouteError(f"{where}.method: expected a mapping")
        mtype = method.get("type", "Exact")
        service, name = method.get("service"), method.get("method")
        if service is None and name is None:
            raise RouteError(f"{where}.method: one of service and method is required")
        if mtype == "Exact":
            for field_name, v in (("service", service), ("method", name)):
                if v is not None and (not isinstance(v, str) or not re.fullmatch(GRPC_NAME, v)):
                    raise RouteError(f"{where}.method.{field_name}: {v!r} is not a gRPC name")
            if service is not None and name is not None:
                out["path"] = {"type": "Exact", "value": f"/{service}/{name}"}
            elif service is not None:
                out["path"] = {"type": "PathPrefix", "value": f"/{service}"}
            else:
                out["path"] = {
                    "type": "RegularExpression",
                    "value": f"/{GRPC_NAME}/{re.escape(str(name))}",
                }
        elif mtype == "RegularExpression":
            s = GRPC_NAME if service is None else f"(?:{service})"
            n = GRPC_NAME if name is None else f"(?:{name})"
            out["path"] = {"type": "RegularExpression", "value": f"/{s}/{n}"}
        else:
            raise RouteError(f"{where}.method.type: {mtype!r} (Exact, RegularExpression)")
    if m.get("headers") is not None:
        out["headers"] = m["headers"]
    return out


@refuse_odd_shapes(RouteError, _odd_shape("GRPCRoute"))
def parse_grpc_route(obj: Mapping[str, Any]) -> HttpRoute:
    """A GRPCRoute (gateway.networking.k8s.io/v1) on a Service, GAMMA style, kept as an
    HttpRoute whose matches are the paths and headers its method and header matches mean, so
    precedence, weights, filters and producer/consumer scoping are the HTTPRoute's. Its
    requests go to backends as gRPC (HTTP/2), whatever the client spoke."""
    md = obj.get("metadata") or {}
    ns, name = md.get("namespace", "default"), md.get("name", "?")
    where = f"GRPCRoute {ns}/{name}: spec"
    spec = obj.get("spec") or {}
    rules = []
    for i, r in enumerate(_list(spec.get("rules"), f"{where}.rules") or [{}]):
        rw = f"{where}.rules[{i}]"
        rule = {k: v for k, v in r.items() if k in ("backendRefs", "filters", "name")}
        matches = [
            _grpc_match(m, f"{rw}.matches[{j}]")
            for j, m in enumerate(_list(r.get("matches"), f"{rw}.matches"))
        ]
        if matches:
            rule["matches"] = matches
        rules.append(rule)
    parents = spec.get("parentRefs")
    return parse_route(
        {"kind": "GRPCRoute", "metadata": md, "spec": {"parentRefs": parents, "rules": rules}}
    )


def parse_routes(objects: Iterable[Mapping[str, Any]]) -> tuple[list[HttpRoute], list[str]]:
    """Every HTTPRoute and GRPCRoute that can be applied, and an error line for each one that
    cannot."""
    routes, errors = [], []
    for obj in objects:
        if obj.get("kind") in HTTP_ROUTE_KINDS:
            try:
                routes.append(parse_http_kind(obj))
            except RouteError as e:
                errors.append(str(e))
    return routes, errors


# -- deciding ------------------------------------------------------------------------------


def routes_for_client(  # noqa: PLR0917
    routes: Iterable[HttpRoute],
    namespace: str,
    service: str,
    port: int,
    client_ns: str,
    port_name: str = "",
) -> list[HttpRoute]:
    """The routes that apply to one client's request to a Service (GAMMA, GEP-1426).

    A producer route (in the Service's namespace) applies to every client. A consumer route
    (in another namespace) applies only to clients of its own namespace, and for them it
    replaces the producer routes. So a route in namespace `attacker` never steers the
    requests of clients elsewhere.
    """
    attached = [r for r in routes if r.attaches_to(namespace, service, port, port_name)]
    if client_ns != namespace:
        consumer = [r for r in attached if r.namespace == client_ns]
        if consumer:
            return consumer
    return [r for r in attached if r.namespace == namespace]


@dataclass(frozen=True)
class ReferenceGrant:
    """Gateway API's ReferenceGrant, as far as routes use it: which HTTPRoute namespaces may
    send to which Services of this one (`name` None: any)."""

    namespace: str
    from_namespaces: frozenset[str]  # of HTTPRoutes
    to_services: tuple[str | None, ...]

    def grants(self, from_ns: str, to_ns: str, to_name: str) -> bool:
        return (
            self.namespace == to_ns
            and from_ns in self.from_namespaces
            and any(n is None or n == to_name for n in self.to_services)
        )


def parse_reference_grant(obj: Mapping[str, Any]) -> ReferenceGrant:
    """Read leniently: a `from` or `to` entry that is not an HTTPRoute or a core Service
    grants nothing (an unreadable grant grants nothing, never more)."""
    md = obj.get("metadata")
    ns = str(md.get("namespace", "default")) if isinstance(md, dict) else "default"
    raw = obj.get("spec")
    spec: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    froms = [f for f in _plain_list(spec.get("from")) if isinstance(f, dict)]
    tos = [t for t in _plain_list(spec.get("to")) if isinstance(t, dict)]
    return ReferenceGrant(
        ns,
        frozenset(
            str(f.get("namespace"))
            for f in froms
            if f.get("group") == API_GROUP and f.get("kind") == "HTTPRoute"
        ),
        tuple(
            None if t.get("name") in (None, "") else str(t.get("name"))
            for t in tos
            if t.get("group", "") in ("", "core") and t.get("kind") == "Service"
        ),
    )


def _plain_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def reference_granted(
    grants: Iterable[ReferenceGrant],
    from_ns: str,
    to_ns: str,
    to_name: str,
    parents: Iterable[tuple[str, str]] = (),
) -> bool:
    """Whether an HTTPRoute in `from_ns` may send to Service `to_ns/to_name`: always within
    a namespace; across namespaces with a ReferenceGrant in the target namespace, or when
    it is one of the route's own parent Services (a GAMMA consumer route sending on to the
    Service it is attached to grants its namespace nothing it could not already reach, and
    Gateway API's MeshConsumerRoute expects it without a grant)."""
    return (
        from_ns == to_ns
        or (to_ns, to_name) in set(parents)
        or any(g.grants(from_ns, to_ns, to_name) for g in grants)
    )


@dataclass(frozen=True)
class Selected:
    route: HttpRoute
    rule: Rule
    match: Match


def select(routes: Sequence[HttpRoute], req: RequestFacts) -> Selected | None:
    """The rule whose match wins by Gateway API precedence (ties: older route, then name)."""
    best: tuple[Any, Selected] | None = None
    for r in routes:
        for rule in r.rules:
            for m in rule.matches:
                if not m.matches(req):
                    continue
                rank = (m.precedence(), _neg(r.created), _neg(r.key))
                if best is None or rank > best[0]:
                    best = (rank, Selected(r, rule, m))
    return None if best is None else best[1]


def _neg(s: str) -> tuple[int, ...]:
    """Sort strings descending inside an ascending-is-better tuple."""
    return tuple(-ord(c) for c in s)


def pick_backend(rule: Rule, rng: random.Random | None = None) -> BackendRef | None:
    """Weighted choice among the rule's backends; None if none can take traffic (500)."""
    candidates = [b for b in rule.backends if b.weight > 0]
    if not candidates:
        return None
    r = (rng or random).uniform(0, sum(b.weight for b in candidates))
    for b in candidates:
        r -= b.weight
        if r < 0:
            return b
    return candidates[-1]
