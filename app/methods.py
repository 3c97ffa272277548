"""HTTP methods beyond the routes' own: HEAD on every GET route, OPTIONS on every path, and a 405 whose
`Allow` names every method the path takes (FastAPI's routes answer HEAD with 405, and a 405 lists only the
methods of the first route whose path matched, e.g. GET but not DELETE on /models/{name}/versions/{version}).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(routes: list[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route takes at this scope's path (HEAD with GET, OPTIONS with any); [] when no route
    has the path. Each method is asked of the routes' own `matches` (FastAPI's included routers included)."""
    methods = {m for m in METHODS if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in routes)}
    if not methods:
        return []
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"})


class MethodsMiddleware:
    """HEAD is GET without the body; OPTIONS answers 204 with `Allow` (404 for a path no route has)."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] != "http" or method not in ("HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        allowed = allowed_methods(self.routes, scope)
        if method == "OPTIONS" and allowed:
            await send({"type": "http.response.start", "status": 204,
                        "headers": [(b"allow", ", ".join(allowed).encode()), (b"content-length", b"0")]})
            return await send({"type": "http.response.body", "body": b""})
        if method == "OPTIONS" or "GET" not in allowed:
            return await self.app(scope, receive, send)

        async def without_body(msg: Message) -> None:
            if msg["type"] == "http.response.body":
                msg = {**msg, "body": b""}
            await send(msg)

        await self.app({**scope, "method": "GET"}, receive, without_body)  # the server's scope stays HEAD


__all__ = ["MethodsMiddleware", "allowed_methods"]
