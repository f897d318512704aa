"""Reading API objects (policies, routes, traffic policies) of any shape.

Objects come from users' YAML or the Kubernetes API: any field may hold any type. A parser
checks what it understands and raises its own error, naming the object and field, for the
rest; `refuse_odd_shapes` turns whatever it did not foresee (a `TypeError` for `targetRefs: 5`)
into that same error, so a parser's gap can never stop the state's writer or a waypoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

T = TypeVar("T")


def object_ref(obj: Mapping[str, Any]) -> str:
    """`namespace/name` from a metadata of any shape."""
    raw = obj.get("metadata")
    md: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    return f"{md.get('namespace', 'default')}/{md.get('name', '?')}"


P = ParamSpec("P")


def refuse_odd_shapes(
    own: type[Exception], error: Callable[[str, Exception], Exception]
) -> Callable[
    [Callable[Concatenate[Mapping[str, Any], P], T]],
    Callable[Concatenate[Mapping[str, Any], P], T],
]:
    """Decorate a parser (the object first, then any settings): an exception other than its
    own error (`own`) becomes `error(ref, exc)`."""

    def decorate(
        parse: Callable[Concatenate[Mapping[str, Any], P], T],
    ) -> Callable[Concatenate[Mapping[str, Any], P], T]:
        @functools.wraps(parse)
        def wrapper(obj: Mapping[str, Any], /, *args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return parse(obj, *args, **kwargs)
            except own:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise error(object_ref(obj), e) from None

        return wrapper

    return decorate
