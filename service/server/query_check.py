"""Query parameters a route does not take are refused (422), not ignored: ``?rio=0:4`` (for
``roi``) or ``?splt=train`` would otherwise answer the whole volume or every scan, a typo that
silently returns the wrong voxels (docs/rest-api.md, "Conventions")."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from store.errors import InvalidParameter

# pages and documents, not data: a browser, a proxy or a link may add its own parameters
# (cache busters, tracking), and nothing they return depends on a parameter
PAGES = ("/viewer", "/docs", "/redoc", "/openapi.json", "/health")
_ATTRIBUTE = "_scancache_query_names"  # kept on the route: found once per route, not per request


def _allowed(route: object) -> frozenset[str]:
    """The query parameters a route declares, its dependencies' included."""
    known = getattr(route, _ATTRIBUTE, None)
    if known is not None:
        return frozenset(known)
    names: set[str] = set()
    pending: list[Any] = [getattr(route, "dependant", None)]
    while pending:  # the route's parameters and its dependencies', recursively
        dependant = pending.pop()
        if dependant is not None:
            names.update(field.alias for field in dependant.query_params)
            pending.extend(dependant.dependencies)
    setattr(route, _ATTRIBUTE, frozenset(names))
    return frozenset(names)


def refuse_unknown_query(request: Request) -> None:
    """App-wide dependency: one line naming the unknown parameter and the ones the route takes."""
    route = request.scope.get("route")
    if route is None or not getattr(route, "dependant", None) or request.url.path.startswith(PAGES):
        return
    allowed = _allowed(route)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise InvalidParameter(unknown[0], f"not a parameter of this route (it takes: {takes})")
