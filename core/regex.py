"""Regular expressions from routes run on RE2: time linear in the input, whatever the pattern.

Python's `re` backtracks: `(a+)+$` against a crafted path takes exponential time and, in a
single-threaded waypoint, stalls every request. Gateway API specifies RE2 syntax for
HTTPRoute's RegularExpression matches, so patterns RE2 refuses (backreferences, lookaround)
are rejected when the route is read, with RE2's reason.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is reported by the route's error, not stderr


class RegexError(ValueError):
    pass


@functools.lru_cache(maxsize=4096)
def compile_re2(pattern: str) -> Any:
    """The compiled pattern (cached: routes are re-read on every state change)."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        reason = e.args[0] if e.args else e
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise RegexError(f"not a valid RE2 expression: {reason}") from None


def fullmatch(pattern: str, text: str) -> bool:
    return compile_re2(pattern).fullmatch(text) is not None
