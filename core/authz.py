"""L4 authorization: Istio's AuthorizationPolicy semantics, as a pure function of the facts.

Policies use `security.veil.dev/v1` with Istio's spec schema, so existing policies port by
changing `apiVersion`. Evaluation (Istio's order): a matching DENY denies; with no ALLOW policy
for the workload the connection is allowed; a matching ALLOW allows; otherwise it is denied.
AUDIT policies never change the decision (they are reported). The agent enforces the L4
fields; L7 fields belong to waypoints, so an ALLOW rule with L7 fields never matches here and
a DENY rule with L7 fields denies on its L4 part alone (both fail closed).

Scope: no selector -> every workload of the policy's namespace; the root namespace
(`veil-system`) without selector -> the whole mesh; `selector.matchLabels` -> matching
workloads (in the root namespace: in every namespace). Policies with `targetRefs` (a Gateway
of class veil-waypoint, or a Service) attach to waypoints and are not the agent's: the
waypoint evaluates them, L7 fields included, with `decide(..., scope=at_waypoint(...))`.

A policy that does not validate never fails open: while a previous valid version exists that
one stays in force; a policy that never validated stands as "deny everything in its scope".
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from veil.core.grammar import port_number
from veil.core.objects import object_ref, refuse_odd_shapes

ROOT_NAMESPACE = "veil-system"
API_VERSION = "security.veil.dev/v1"
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")

SOURCE_L4 = {
    "principals",
    "notPrincipals",
    "serviceAccounts",
    "notServiceAccounts",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
}
# remoteIpBlocks / remote.ip: the original client's address, which only a waypoint knows
# (from the CONNECT that brought the request); an agent may be seeing a waypoint's connection,
# so there they are L7 fields, as in Istio's ambient conversion (ALLOW: never; DENY: broader).
SOURCE_L7 = {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
OPERATION_L4 = {"ports", "notPorts"}
OPERATION_L7 = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
WHEN_L4 = {
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
}
WHEN_L7_PREFIXES = ("request.", "experimental.", "remote.ip")
SPEC_FIELDS = {"selector", "targetRef", "targetRefs", "action", "rules", "provider"}


class PolicyError(ValueError):
    """A policy that does not validate: names the policy and the field."""

    def __init__(self, policy: str, path: str, message: str) -> None:
        super().__init__(f"AuthorizationPolicy {policy}: {path}: {message}")
        self.policy, self.path, self.message = policy, path, message


@dataclass(frozen=True)
class HttpFacts:
    """What a waypoint knows about a request (L7)."""

    method: str
    path: str  # without the query string
    host: str  # the Host / :authority as sent (port included), lower case, no trailing dot
    headers: Mapping[str, str]  # lower-case names
    request_principal: str | None = None  # "<iss>/<sub>" of a validated JWT
    claims: Mapping[str, Any] = field(default_factory=dict)
    remote_ip: str = ""  # the original client's address ("" when unknown: never in a block)


@dataclass(frozen=True)
class Facts:
    """What the agent (or a waypoint) knows about a connection or request when it decides."""

    source_ip: str
    destination_ip: str
    destination_port: int
    principal: str | None = None  # "cluster.local/ns/x/sa/y" (Istio's form), None for plaintext
    destination_labels: Mapping[str, str] = field(default_factory=dict)
    destination_namespace: str = ""
    http: HttpFacts | None = None
    waypoint: bool = False  # judged by a waypoint (which knows connection.sni), not an agent
    sni: str = ""  # the stream's TLS server name (a ClientHello's SNI), "" without one

    @property
    def source_namespace(self) -> str | None:
        if self.principal is None:
            return None
        parts = self.principal.split("/")
        return parts[2] if len(parts) == 5 and parts[1] == "ns" else None

    @property
    def service_account(self) -> str | None:
        """`<ns>/<sa>` of the peer's identity (any trust domain), None for plaintext."""
        if self.principal is None:
            return None
        parts = self.principal.split("/")
        ok = len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa"
        return f"{parts[2]}/{parts[4]}" if ok else None


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @property
    def l7(self) -> bool:
        return self.key.startswith(WHEN_L7_PREFIXES)


@dataclass(frozen=True)
class Rule:
    sources: tuple[Mapping[str, tuple[str, ...]], ...] = ()  # empty: any source
    operations: tuple[Mapping[str, tuple[str, ...]], ...] = ()  # empty: any operation
    conditions: tuple[Condition, ...] = ()
    has_l7: bool = False

    @property
    def uses_sni(self) -> bool:
        return any(c.key == "connection.sni" for c in self.conditions)

    @property
    def uses_remote_ip(self) -> bool:
        return any("remoteIpBlocks" in s or "notRemoteIpBlocks" in s for s in self.sources) or any(
            c.key == "remote.ip" for c in self.conditions
        )


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    action: str
    rules: tuple[Rule, ...]
    selector: Mapping[str, str] | None = None
    waypoint: bool = False  # targetRefs: for waypoints, not the agent
    invalid: str = ""  # why the policy stands as deny-all (never validated)
    target_refs: tuple[tuple[str, str], ...] = ()  # (kind, name) in the policy's namespace
    provider: str = ""  # CUSTOM: the extension provider (ext_authz) that decides

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def has_l7(self) -> bool:
        return any(r.has_l7 for r in self.rules)

    def applies_to(self, facts: Facts) -> bool:
        if self.waypoint:
            return False
        if self.namespace not in (ROOT_NAMESPACE, facts.destination_namespace):
            return False
        if self.selector is None:
            return True
        return all(facts.destination_labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str  # the policy that decided ("" when none did)
    reason: str
    audited: tuple[str, ...] = ()


# -- parsing ---------------------------------------------------------------------------------


def _strings(ref: str, path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(ref, path, "expected a list of strings")
    return tuple(value)


def _check_cidrs(ref: str, path: str, values: Sequence[str]) -> None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise PolicyError(ref, path, f"{v!r} is not an IP address or CIDR") from None


def _check_ports(ref: str, path: str, values: Sequence[str]) -> None:
    for v in values:
        if port_number(v) is None:
            raise PolicyError(ref, path, f"{v!r} is not a port number")


def _fields(  # noqa: PLR0917 - the field sets of one schema section
    ref: str, path: str, doc: Any, l4: set[str], l7: set[str], cidr: set[str], ports: set[str]
) -> tuple[dict[str, tuple[str, ...]], bool]:
    if not isinstance(doc, dict):
        raise PolicyError(ref, path, "expected a mapping")
    out: dict[str, tuple[str, ...]] = {}
    has_l7 = False
    for key, value in doc.items():
        if key not in l4 | l7:
            raise PolicyError(ref, f"{path}.{key}", "unknown field")
        values = _strings(ref, f"{path}.{key}", value)
        if key in cidr:
            _check_cidrs(ref, f"{path}.{key}", values)
        if key in ports:
            _check_ports(ref, f"{path}.{key}", values)
        if key in ("paths", "notPaths"):
            for v in values:
                if "{" in v or "}" in v:
                    try:
                        path_template(v)
                    except ValueError as e:
                        raise PolicyError(ref, f"{path}.{key}", f"{v!r}: {e}") from None
        if key in l7:
            has_l7 = True
        out[key] = values
    return out, has_l7


def _clauses(  # noqa: PLR0917 - one schema section's names and field sets
    ref: str,
    rp: str,
    rule: Mapping[str, Any],
    key: str,
    inner: str,
    l4: set[str],
    l7: set[str],
    cidr: set[str],
    ports: set[str],
) -> tuple[list[dict[str, tuple[str, ...]]], bool]:
    """A rule's `from` (sources) or `to` (operations) list: the L4 fields, and whether any
    clause carries L7 fields."""
    out, has_l7 = [], False
    for j, clause in enumerate(rule.get(key) or []):
        if not isinstance(clause, dict) or set(clause) - {inner}:
            raise PolicyError(ref, f"{rp}.{key}[{j}]", f"expected {{{inner}: {{...}}}}")
        fields, l7_here = _fields(
            ref, f"{rp}.{key}[{j}].{inner}", clause.get(inner) or {}, l4, l7, cidr, ports
        )
        out.append(fields)
        has_l7 |= l7_here
    return out, has_l7


def _qualify_service_accounts(
    src: dict[str, tuple[str, ...]], namespace: str
) -> dict[str, tuple[str, ...]]:
    """`serviceAccounts: [sa]` means `<policy namespace>/sa` (Istio); exact names only."""
    for key in ("serviceAccounts", "notServiceAccounts"):
        if key in src:
            src[key] = tuple(v if "/" in v else f"{namespace}/{v}" for v in src[key])
    return src


@refuse_odd_shapes(PolicyError, lambda ref, e: PolicyError(ref, "spec", f"cannot read: {e!r}"))
def parse_policy(obj: Mapping[str, Any]) -> Policy:
    md = obj.get("metadata") or {}
    ref = f"{md.get('namespace', 'default')}/{md.get('name', '?')}"
    if obj.get("apiVersion") != API_VERSION:
        raise PolicyError(ref, "apiVersion", f"expected {API_VERSION!r}")
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise PolicyError(ref, "spec", "expected a mapping")
    for key in spec:
        if key not in SPEC_FIELDS:
            raise PolicyError(ref, f"spec.{key}", "unknown field")
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise PolicyError(ref, "spec.action", f"{action!r} is not one of {', '.join(ACTIONS)}")
    provider = ""
    if action == "CUSTOM":
        p = spec.get("provider")
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            raise PolicyError(ref, "spec.provider.name", "CUSTOM needs the extension provider")
        provider = p["name"]
        if "targetRefs" not in spec and "targetRef" not in spec:
            raise PolicyError(
                ref,
                "spec.action",
                "CUSTOM (external authorization) is enforced by waypoints: attach the policy "
                "to a waypoint Gateway or a Service with targetRefs",
            )
    elif "provider" in spec:
        raise PolicyError(ref, "spec.provider", "only with action CUSTOM")
    selector = None
    if "selector" in spec:
        sel = spec["selector"]
        labels = sel.get("matchLabels") if isinstance(sel, dict) else None
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise PolicyError(ref, "spec.selector.matchLabels", "expected a map of strings")
        selector = dict(labels)
    waypoint = "targetRefs" in spec or "targetRef" in spec
    raw_rules = spec.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise PolicyError(ref, "spec.rules", "expected a list")
    rules = []
    for i, r in enumerate(raw_rules):
        rp = f"spec.rules[{i}]"
        if not isinstance(r, dict):
            raise PolicyError(ref, rp, "expected a mapping")
        for key in r:
            if key not in ("from", "to", "when"):
                raise PolicyError(ref, f"{rp}.{key}", "unknown field")
        sources, l7_from = _clauses(
            ref,
            rp,
            r,
            "from",
            "source",
            SOURCE_L4,
            SOURCE_L7,
            {"ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"},
            set(),
        )
        sources = [
            _qualify_service_accounts(src, md.get("namespace", "default")) for src in sources
        ]
        operations, l7_to = _clauses(
            ref, rp, r, "to", "operation", OPERATION_L4, OPERATION_L7, set(), {"ports", "notPorts"}
        )
        has_l7 = l7_from or l7_to
        conditions = []
        for j, w in enumerate(r.get("when") or []):
            wp = f"{rp}.when[{j}]"
            if not isinstance(w, dict) or not isinstance(w.get("key"), str):
                raise PolicyError(ref, wp, "expected {key: ..., values: [...]}")
            for key in w:
                if key not in ("key", "values", "notValues"):
                    raise PolicyError(ref, f"{wp}.{key}", "unknown field")
            key = w["key"]
            values = _strings(ref, f"{wp}.values", w.get("values") or [])
            not_values = _strings(ref, f"{wp}.notValues", w.get("notValues") or [])
            if key == "connection.sni":
                conditions.append(Condition(key, values, not_values))
                continue
            if key == "remote.ip":
                has_l7 = True
                _check_cidrs(ref, f"{wp}.values", (*values, *not_values))
                conditions.append(Condition(key, values, not_values))
                continue
            if key.startswith(WHEN_L7_PREFIXES):
                has_l7 = True
                if not _L7_KEY.match(key):
                    raise PolicyError(ref, f"{wp}.key", f"unknown condition key {key!r}")
                conditions.append(Condition(key, values, not_values))
                continue
            if key not in WHEN_L4:
                raise PolicyError(ref, f"{wp}.key", f"unknown condition key {key!r}")
            if key in ("source.ip", "destination.ip"):
                _check_cidrs(ref, f"{wp}.values", (*values, *not_values))
            if key == "destination.port":
                _check_ports(ref, f"{wp}.values", (*values, *not_values))
            conditions.append(Condition(key, values, not_values))
        rules.append(Rule(tuple(sources), tuple(operations), tuple(conditions), has_l7))
    refs = []
    raw_refs = spec.get("targetRefs") or ([spec["targetRef"]] if spec.get("targetRef") else [])
    if not isinstance(raw_refs, list):
        raise PolicyError(ref, "spec.targetRefs", "expected a list")
    for i, t in enumerate(raw_refs):
        kind = t.get("kind") if isinstance(t, dict) else None
        if kind == "GatewayClass":
            if md.get("namespace") != ROOT_NAMESPACE or t.get("name") != WAYPOINT_CLASS:
                raise PolicyError(
                    ref,
                    f"spec.targetRefs[{i}]",
                    f"a GatewayClass target must be {WAYPOINT_CLASS!r}, from a policy in the "
                    f"root namespace {ROOT_NAMESPACE!r}",
                )
        elif kind not in ("Gateway", "Service"):
            raise PolicyError(
                ref, f"spec.targetRefs[{i}].kind", "expected Gateway, Service or GatewayClass"
            )
        assert isinstance(t, dict)
        refs.append((str(kind), str(t.get("name", ""))))
    return Policy(
        namespace=md.get("namespace", "default"),
        name=str(md.get("name", "?")),
        action=action,
        rules=tuple(rules),
        selector=selector,
        waypoint=waypoint,
        target_refs=tuple(refs),
        provider=provider,
    )


@dataclass
class PolicySet:
    """The policies in force, and the errors of those that did not validate.

    Keeps the last valid version of each policy across updates (`update()`), so a bad edit
    never removes a policy that was in force.
    """

    policies: dict[str, Policy] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def has_custom(self) -> bool:
        """Whether any CUSTOM policy exists: without one, requests skip that step."""
        return any(p.action == "CUSTOM" for p in self.policies.values())

    def update(self, objects: Iterable[Mapping[str, Any]]) -> PolicySet:
        policies: dict[str, Policy] = {}
        errors: dict[str, str] = {}
        for obj in objects:
            if obj.get("kind") != "AuthorizationPolicy":
                continue
            ref = object_ref(obj)
            try:
                policies[ref] = parse_policy(obj)
            except PolicyError as e:
                errors[ref] = str(e)
                previous = self.policies.get(ref)
                if previous is not None and not previous.invalid:
                    policies[ref] = previous  # the last valid version stays in force
                else:  # never valid: deny everything in its scope rather than fail open
                    refs = _target_refs(obj)
                    namespace, _, name = ref.partition("/")
                    policies[ref] = Policy(
                        namespace=namespace,
                        name=name,
                        action="DENY",
                        rules=(Rule(),),
                        selector=_selector(obj),
                        invalid=str(e),
                        waypoint=refs is not None,
                        target_refs=refs or (),
                    )
        return PolicySet(policies, errors)


def _target_refs(obj: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """A broken policy's targetRefs, read leniently (None: it has none, it is the agent's)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict) or not ("targetRefs" in spec or "targetRef" in spec):
        return None
    raw = spec.get("targetRefs") or [spec.get("targetRef")]
    refs = [
        (str(t.get("kind", "Gateway")), str(t.get("name", "")))
        for t in (raw if isinstance(raw, list) else [])
        if isinstance(t, dict)
    ]
    return tuple(refs)


def _selector(obj: Mapping[str, Any]) -> Mapping[str, str] | None:
    sel = (obj.get("spec") or {}).get("selector") if isinstance(obj.get("spec"), dict) else None
    labels = sel.get("matchLabels") if isinstance(sel, dict) else None
    if isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values()):
        return dict(labels)
    return None  # an unreadable selector: the whole namespace, to be safe


# -- matching --------------------------------------------------------------------------------


def _glob(pattern: str, value: str) -> bool:
    """Istio's string match: exact, `*`, `prefix*` or `*suffix`."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


# Envoy's URI template matcher, which Istio's path templates compile to: `{*}` is one
# non-empty path segment, `{**}` any run of path characters, slashes included (so
# `/api/{**}` matches `/api/` and `/api/a/b`). Literals may hold only RFC 3986 path characters.
_PCHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@="
_SEGMENT, _ANY = f"[{_PCHARS}]+", f"[{_PCHARS}/]*"
_LITERAL = re.compile(f"[{_PCHARS}/]*")


@functools.lru_cache(maxsize=1024)
def path_template(template: str) -> re.Pattern[str]:
    """Istio's `paths` template (`/api/{*}/items`, `/files/{**}`) as a full-match regex;
    ValueError for a template Envoy would refuse (so the policy is refused, not guessed)."""
    if not template.startswith("/"):
        raise ValueError("a path template starts with /")
    parts = re.split(r"(\{\*\*\}|\{\*\})", template)
    out = []
    for i, part in enumerate(parts):
        if part == "{**}":
            if any(p in ("{*}", "{**}") for p in parts[i + 1 :]):
                raise ValueError("{**} must be the last operator")
            out.append(_ANY)
        elif part == "{*}":
            out.append(_SEGMENT)
        elif _LITERAL.fullmatch(part):
            out.append(re.escape(part))
        else:
            raise ValueError("only {*} and {**} may appear in braces, and only path characters")
    return re.compile("".join(out))


def _path_matches(patterns: Sequence[str], path: str | None) -> bool:
    """Istio's path matching: a template if it holds `{*}`/`{**}`, else `_glob`."""
    if path is None:
        return False
    path = path.split("?", 1)[0]
    return any(
        path_template(p).fullmatch(path) is not None if "{" in p else _glob(p, path)
        for p in patterns
    )


def _in_cidrs(ip: str, cidrs: Sequence[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


def _strings_match(values: Sequence[str], value: str | None) -> bool:
    return value is not None and any(_glob(v, value) for v in values)


def _source_matches(src: Mapping[str, tuple[str, ...]], f: Facts) -> bool:
    for key, values in src.items():
        ok = True
        if key in ("remoteIpBlocks", "notRemoteIpBlocks"):
            if f.http is None:
                continue  # the agent: judged on the L4 part (see rule_matches)
            if not f.http.remote_ip:
                continue  # unknown here as at an agent: see rule_matches
            ok = _in_cidrs(f.http.remote_ip, values) == (key == "remoteIpBlocks")
        elif key in SOURCE_L7:
            if f.http is None:
                continue  # the agent: judged on the L4 part (see rule_matches)
            got = f.http.request_principal
            ok = _strings_match(values, got) == (key == "requestPrincipals")
        elif key == "principals":
            ok = _strings_match(values, f.principal)
        elif key == "notPrincipals":
            ok = not _strings_match(values, f.principal)
        elif key in ("serviceAccounts", "notServiceAccounts"):
            ok = (f.service_account in values) == (key == "serviceAccounts")
        elif key == "namespaces":
            ok = _strings_match(values, f.source_namespace)
        elif key == "notNamespaces":
            ok = not _strings_match(values, f.source_namespace)
        elif key in ("ipBlocks", "remoteIpBlocks"):
            ok = _in_cidrs(f.source_ip, values)
        elif key in ("notIpBlocks", "notRemoteIpBlocks"):
            ok = not _in_cidrs(f.source_ip, values)
        if not ok:
            return False
    return True


def _operation_matches(op: Mapping[str, tuple[str, ...]], f: Facts) -> bool:
    port = str(f.destination_port)
    if "ports" in op and port not in op["ports"]:
        return False
    if "notPorts" in op and port in op["notPorts"]:
        return False
    h = f.http
    if h is None:
        return True  # L7 fields: the agent judges the L4 part only (see rule_matches)
    # `hosts` match the authority as Istio does (case-insensitive, port included: list
    # `catalog` and `catalog:9080`, or `catalog*`); the waypoint drops a trailing dot.
    for key, value in (("hosts", h.host.lower()), ("methods", h.method), ("paths", h.path)):
        match = _path_matches if key == "paths" else _strings_match
        if key in op and not match([v.lower() if key == "hosts" else v for v in op[key]], value):
            return False
        neg = "not" + key[0].upper() + key[1:]
        if neg in op and match([v.lower() if key == "hosts" else v for v in op[neg]], value):
            return False
    return True


_L7_KEY = re.compile(
    r"^(request\.headers\[[^\]]+\]|request\.auth\.claims\[[^\]]+\](\[[^\]]+\])*|"
    r"request\.auth\.principal|request\.auth\.audiences|request\.auth\.presenter|"
    r"experimental\..+)$"
)


def _l7_value(key: str, h: HttpFacts) -> list[str]:
    """The request's values for an L7 `when` key (a claim can be a list)."""
    if key.startswith("request.headers["):
        v = h.headers.get(key[len("request.headers[") : -1].lower())
        return [] if v is None else [v]
    if key.startswith("request.auth.claims["):
        node: Any = h.claims
        for part in re.findall(r"\[([^\]]+)\]", key):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            return []
        return [str(x) for x in node] if isinstance(node, list) else [str(node)]
    if key == "request.auth.principal":
        return [h.request_principal] if h.request_principal else []
    if key == "request.auth.audiences":
        aud = h.claims.get("aud")
        return [str(a) for a in aud] if isinstance(aud, list) else ([str(aud)] if aud else [])
    if key == "request.auth.presenter":
        return [str(h.claims["azp"])] if "azp" in h.claims else []
    return []


def _remote_ip_matches(c: Condition, h: HttpFacts) -> bool:
    if not h.remote_ip:
        return True  # unknown here as at an agent: see rule_matches
    return (not c.values or _in_cidrs(h.remote_ip, c.values)) and not (
        c.not_values and _in_cidrs(h.remote_ip, c.not_values)
    )


def _condition_matches(c: Condition, f: Facts) -> bool:
    if c.key == "connection.sni":
        if not f.waypoint:
            return True  # an agent does not read the stream: see rule_matches
        return (not c.values or _strings_match(c.values, f.sni)) and not (
            c.not_values and _strings_match(c.not_values, f.sni)
        )
    if c.l7:
        if f.http is None:
            return True  # the agent: judged on the L4 part (see rule_matches)
        if c.key == "remote.ip":
            return _remote_ip_matches(c, f.http)
        got = _l7_value(c.key, f.http)
        return (not c.values or any(_strings_match(c.values, g) for g in got)) and not (
            c.not_values and any(_strings_match(c.not_values, g) for g in got)
        )
    if c.key in ("source.ip", "destination.ip"):
        ip = f.destination_ip if c.key == "destination.ip" else f.source_ip
        return (not c.values or _in_cidrs(ip, c.values)) and not (
            c.not_values and _in_cidrs(ip, c.not_values)
        )
    value = {
        "source.namespace": f.source_namespace,
        "source.principal": f.principal,
        "destination.port": str(f.destination_port),
    }[c.key]
    return (not c.values or _strings_match(c.values, value)) and not (
        c.not_values and _strings_match(c.not_values, value)
    )


def rule_matches(rule: Rule, f: Facts, action: str) -> bool:
    if rule.has_l7 and action == "ALLOW" and f.http is None:
        return False  # L7 fields are a waypoint's: the agent cannot prove them, so no match
    if action == "ALLOW" and rule.uses_sni and not f.waypoint:
        return False  # connection.sni is a waypoint's: the agent cannot prove it
    if action == "ALLOW" and f.http is not None and not f.http.remote_ip and rule.uses_remote_ip:
        return False  # the client's address is unknown: nothing about it can be proven
    return (
        (not rule.sources or any(_source_matches(s, f) for s in rule.sources))
        and (not rule.operations or any(_operation_matches(o, f) for o in rule.operations))
        and all(_condition_matches(c, f) for c in rule.conditions)
    )


WAYPOINT_CLASS = "veil-waypoint"


def at_waypoint(
    namespace: str,
    gateway: str,
    services: Collection[str],
    service_namespace: str | None = None,
) -> Callable[[Policy], bool]:
    """Which policies a waypoint enforces for a request: those in its namespace whose
    targetRefs name it (the Gateway), those in the addressed Service's namespace
    (`service_namespace`, the waypoint's own unless it is shared across namespaces) that name
    the Service (a pod addressed by IP: every Service that selects it), and those in the root
    namespace that target the GatewayClass `veil-waypoint` (every waypoint of the mesh)."""
    svc_ns = service_namespace or namespace

    def scope(p: Policy) -> bool:
        if not p.waypoint:
            return False
        if p.namespace == ROOT_NAMESPACE and ("GatewayClass", WAYPOINT_CLASS) in p.target_refs:
            return True
        return any(
            (kind == "Gateway" and name == gateway and p.namespace == namespace)
            or (kind == "Service" and name in services and p.namespace == svc_ns)
            for kind, name in p.target_refs
        )

    return scope


def custom_checks(
    policies: Iterable[Policy], f: Facts, scope: Callable[[Policy], bool]
) -> tuple[Policy, ...]:
    """The CUSTOM policies (at a waypoint) whose rules select this request: each one's
    provider must allow it before DENY and ALLOW policies are looked at (Istio's order). A
    rule is matched as a DENY's would be (what cannot be judged does not narrow it), so in
    doubt the provider is asked."""
    return tuple(
        p
        for p in sorted((p for p in policies if scope(p)), key=lambda p: p.ref)
        if p.action == "CUSTOM" and any(rule_matches(r, f, "DENY") for r in p.rules)
    )


def decide(
    policies: Iterable[Policy], f: Facts, scope: Callable[[Policy], bool] | None = None
) -> Decision:
    """Istio's evaluation order, for one connection (agent) or request (waypoint, `scope`);
    CUSTOM policies are asked first, by the waypoint (`custom_checks`), and are not here."""
    applies = scope or (lambda p: p.applies_to(f))
    applicable = sorted((p for p in policies if applies(p)), key=lambda p: p.ref)
    audited = tuple(
        p.ref
        for p in applicable
        if p.action == "AUDIT" and any(rule_matches(r, f, "AUDIT") for r in p.rules)
    )
    for p in applicable:
        if p.action == "DENY" and any(rule_matches(r, f, "DENY") for r in p.rules):
            why = p.invalid or "a DENY rule matches"
            return Decision(False, p.ref, why, audited)
    allows = [p for p in applicable if p.action == "ALLOW"]
    if not allows:
        return Decision(True, "", "no ALLOW policy applies to the workload", audited)
    for p in allows:
        if any(rule_matches(r, f, "ALLOW") for r in p.rules):
            return Decision(True, p.ref, "an ALLOW rule matches", audited)
    return Decision(
        False,
        allows[0].ref if len(allows) == 1 else "",
        f"no rule of the ALLOW policies ({', '.join(p.ref for p in allows)}) matches",
        audited,
    )
