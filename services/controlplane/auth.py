"""REST side of the token table (``services.common.auth``): every ``/v1`` route declares the scopes
it accepts with ``needs(...)``; a request without a valid bearer token gets 401, one whose token
lacks the scope gets 403 naming the scope. Every mutating request leaves one audit line (logger
``huvidpo.audit``): actor, method, route, status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import Principal, TokenTable, bearer
from services.controlplane import problems
from services.controlplane.metrics import route_template

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Declares the OpenAPI ``securitySchemes`` entry (HTTP bearer) and puts it on every route that
# ``needs`` a scope, so /docs has an Authorize button; the token itself is checked by ScopeCheck.
BEARER_SCHEME = HTTPBearer(
    scheme_name="bearer",
    description="A control-plane token (HUVIDPO_TOKEN): Authorization: Bearer <token>",
    auto_error=False,
)
audit_log = logging.getLogger("huvidpo.audit")


class ScopeCheck:
    """FastAPI dependency: the caller's ``Principal`` if its token grants one of ``scopes``."""

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self.scopes = scopes

    def __call__(
        self, request: Request, _: HTTPAuthorizationCredentials | None = Depends(BEARER_SCHEME)
    ) -> Principal:
        table: TokenTable = request.app.state.tokens
        challenge = {"WWW-Authenticate": 'Bearer realm="huvidpo"'}
        token = bearer(request.headers.get("authorization", ""))
        if token is None and not table.open:
            raise HTTPException(
                401, "a bearer token is required (Authorization: Bearer <token>)", headers=challenge
            )
        principal = table.verify(token or "")
        if principal is None:
            raise HTTPException(
                401,
                "the bearer token is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="huvidpo", error="invalid_token"'},
            )
        request.state.principal = principal
        if not principal.allows(*self.scopes):
            needed = " or ".join(f"'{s}'" for s in self.scopes)
            raise HTTPException(
                403,
                f"this route needs the {needed} scope; token '{principal.name}' has "
                f"{sorted(principal.scopes)}",
            )
        return principal


def needs(*scopes: str) -> Any:
    """``Depends`` on a ``ScopeCheck`` for ``scopes`` (any one suffices; ``admin`` passes all)."""
    return Depends(ScopeCheck(tuple(scopes)))


class AuditMiddleware:
    """Pure ASGI middleware: one ``huvidpo.audit`` line per mutating request, after its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in WRITE_METHODS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            principal = scope.get("state", {}).get("principal")
            actor = principal.name if isinstance(principal, Principal) else "-"
            audit_log.info(
                "audit actor=%s method=%s route=%s path=%s status=%d",
                actor,
                scope.get("method"),
                route_template(scope),
                scope.get("path", ""),
                status,
            )


router = APIRouter(prefix="/v1", tags=["auth"])


class WhoAmI(BaseModel):
    name: str = Field(
        description="the token's name: the actor in audit lines and on records, and the rater id"
    )
    scopes: list[str]
    anonymous: bool = Field(description="true only in dev mode with no token configured (open access)")


@router.get(
    "/whoami",
    response_model=WhoAmI,
    responses=problems.common_responses(401),
    summary="The caller's token name and scopes",
)
def whoami(who: Principal = needs()) -> dict[str, Any]:
    return {"name": who.name, "scopes": sorted(who.scopes), "anonymous": who.anonymous}


def route_scopes(route: APIRoute) -> tuple[str, ...] | None:
    """The scopes ``route`` declares (through ``needs``), or None for an open route."""
    stack = [route.dependant]
    while stack:
        d = stack.pop()
        if isinstance(d.call, ScopeCheck):
            return d.call.scopes
        stack += d.dependencies
    return None


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every ``APIRoute`` under ``routes``, through included routers (FastAPI includes them lazily)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from api_routes(inner.routes)


def document_auth(app: FastAPI) -> None:
    """Every route behind a token documents 401 and 403 (problem+json), and its scopes."""
    for route in api_routes(app.routes):
        scopes = route_scopes(route)
        if scopes is None:
            continue
        for status, problem in problems.common_responses(401, 403).items():
            route.responses.setdefault(status, problem)
        needed = " or ".join(f"`{s}`" for s in scopes) if scopes else "any valid token"
        note = f"Scope: {needed} (or `admin`)."
        if note not in (route.description or ""):  # the routers are module-level: once per route
            route.description = ((route.description or "") + "\n\n" + note).strip()
