"""Query parameters a route does not take are refused (422), not ignored: ``?rio=0:4`` (for
``roi``) or ``?splt=train`` would otherwise answer the whole volume or every scan, a typo that
silently returns the wrong voxels (docs/rest-api.md, "Conventions"). So is a parameter of one
value given twice (``?roi=0:4&roi=0:8`` would answer the last one)."""

from __future__ import annotations

import types
import typing
from collections import Counter
from typing import Any

from starlette.requests import Request

from store.errors import InvalidParameter
from store.roi import PLAIN_INT, integer_problem

# pages and documents, not data: a browser, a proxy or a link may add its own parameters
# (cache busters, tracking), and nothing they return depends on a parameter
PAGES = ("/viewer", "/docs", "/redoc", "/openapi.json", "/health")
_ATTRIBUTE = "_scancache_query_names"  # kept on the route: found once per route, not per request


def _takes_several(annotation: Any) -> bool:
    """A list-typed parameter (``split: list[str] | None``) takes one value per repetition."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_takes_several(a) for a in typing.get_args(annotation))
    return False


def _integer(annotation: Any) -> bool:
    """An integer-typed parameter (``z: int | None``, ``subject_id: list[int] | None``)."""
    if annotation is int:
        return True
    return any(_integer(a) for a in typing.get_args(annotation) if a is not bool)


def _allowed(route: object) -> dict[str, tuple[bool, bool]]:
    """The query parameters a route declares, its dependencies' included: name -> (whether it
    may be repeated, whether it is an integer)."""
    known = getattr(route, _ATTRIBUTE, None)
    if known is not None:
        return dict(known)
    names: dict[str, tuple[bool, bool]] = {}
    pending: list[Any] = [getattr(route, "dependant", None)]
    while pending:  # the route's parameters and its dependencies', recursively
        dependant = pending.pop()
        if dependant is not None:
            for field in dependant.query_params:
                annotation = getattr(field.field_info, "annotation", None)
                names[field.alias] = (_takes_several(annotation), _integer(annotation))
            pending.extend(dependant.dependencies)
    setattr(route, _ATTRIBUTE, dict(names))
    return names


def refuse_unknown_query(request: Request) -> None:
    """App-wide dependency: one line naming the unknown parameter and the ones the route takes."""
    route = request.scope.get("route")
    if route is None or not getattr(route, "dependant", None) or request.url.path.startswith(PAGES):
        return
    allowed = _allowed(route)
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise InvalidParameter(unknown[0], f"not a parameter of this route (it takes: {takes})")
    counts = Counter(k for k, _ in request.query_params.multi_items())
    twice = sorted(k for k, n in counts.items() if n > 1 and not allowed[k][0])
    if twice:
        raise InvalidParameter(twice[0], "given more than once (it takes one value)")
    for key, value in request.query_params.multi_items():
        # the rule of roi's bounds: int() (and so the validation after this) takes "1_0" as 10
        if allowed[key][1] and PLAIN_INT.fullmatch(value.strip(" \t")) is None:
            raise InvalidParameter(key, integer_problem(value))
