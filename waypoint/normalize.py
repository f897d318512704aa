"""Request targets as policies and routes see them: one spelling per resource (pure).

A DENY on `/admin*` must hold for `/./admin`, `/x/../admin`, `/%61dmin` and the absolute form
`http://cart/admin`. Every request target is reduced to the one spelling the backend will act
on, *before* authorization and routing, and that normalized target is what is forwarded, so
the policy judges exactly what the backend receives (as Istio and Envoy do).

The modes are Istio's mesh-wide `pathNormalization` options:

| mode | what is done (each includes the rows above it) |
|---|---|
| NONE | absolute form split into Host and path; invalid targets refused |
| BASE | RFC 3986: escaped unreserved characters decoded, `\\` as `/`, dot segments removed |
| MERGE_SLASHES (Veil's default) | runs of `/` merged into one |
| DECODE_AND_MERGE_SLASHES | `%2F` and `%5C` decoded first (to `/` and `\\`) |

Veil's default is MERGE_SLASHES, one step stricter than Istio's BASE: under BASE, `//admin`
passes a DENY on `/admin*` and many backends serve it as `/admin`.

Refused with 400 (`BadTarget`): a target that is not origin form (`/...`), absolute form
(`http(s)://authority/...`) or `*` (OPTIONS only); a fragment; user info in the authority; a
`%` not followed by two hex digits; an encoded NUL.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class PathNormalization(enum.Enum):
    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


DEFAULT = PathNormalization.MERGE_SLASHES


class BadTarget(ValueError):
    """A request target that has no single meaning: answered 400."""


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # normalized, starts with "/" (or is "*")
    query: str  # "?..." as received, or ""
    authority: str | None = None  # from an absolute-form target: replaces Host

    @property
    def target(self) -> str:
        return self.path + self.query


_ABSOLUTE = re.compile(r"(?i:https?)://([^/?#]*)(.*)", re.DOTALL)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_SLASHES = re.compile(r"/{2,}")


def normalize_target(raw: str, mode: PathNormalization = DEFAULT, method: str = "GET") -> Target:
    """The request target as the backend will act on it; BadTarget if it has no one meaning."""
    authority = None
    if raw == "*":
        if method != "OPTIONS":
            raise BadTarget("the asterisk form is only for OPTIONS")
        return Target("*", "")
    if not raw.startswith("/"):
        m = _ABSOLUTE.fullmatch(raw)
        if m is None:
            raise BadTarget(f"request target {raw[:64]!r} is neither a path nor an absolute URI")
        authority, raw = m.group(1), m.group(2)
        if not authority or "@" in authority:
            raise BadTarget("absolute-form target without a host, or with user info")
        if not raw or raw.startswith("?"):
            raw = "/" + raw
        elif not raw.startswith("/"):
            raise BadTarget("absolute-form target whose path does not start with /")
    if "#" in raw:
        raise BadTarget("a fragment has no place in a request target")
    path, sep, query = raw.partition("?")
    if "%" in path:
        path = _decode(path, mode)
    if mode is PathNormalization.NONE:
        return Target(path, sep + query, authority)
    if "\\" in path:
        path = path.replace("\\", "/")
    if "/." in path:
        path = remove_dot_segments(path)
    if mode is not PathNormalization.BASE and "//" in path:
        path = _SLASHES.sub("/", path)
    return Target(path, sep + query, authority)


def _decode(path: str, mode: PathNormalization) -> str:
    """Check every escape; under BASE and above decode unreserved characters (and, with
    DECODE_AND_MERGE_SLASHES, `%2F` and `%5C`); other escapes stay as sent."""
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        hx = path[i + 1 : i + 3]
        if len(hx) < 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            raise BadTarget(f"bad percent-encoding at {path[i : i + 3]!r}")
        ch = chr(int(hx, 16))
        if ch == "\0":
            raise BadTarget("an encoded NUL in the path")
        if mode is not PathNormalization.NONE and (
            ch in _UNRESERVED
            or (mode is PathNormalization.DECODE_AND_MERGE_SLASHES and ch in "/\\")
        ):
            out.append(ch)
        else:
            out.append("%" + hx)  # as sent: Envoy keeps the case of escapes it leaves
        i += 3
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, for an absolute path."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def normalize_authority(authority: str) -> str:
    """A Host / :authority as `hosts` rules match it: lower case, without the trailing dot of
    a fully qualified name (`cart.shop.:80` is `cart.shop:80`); the port stays."""
    host, port = authority.lower(), ""
    if not host.endswith("]") and host.count(":") == 1:
        host, port = host.split(":")
        port = ":" + port
    return host.rstrip(".") + port
