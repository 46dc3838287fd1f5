"""RFC 9457 problem details: every error response of the API is ``application/problem+json``.

Each kind of error has a stable ``type`` URI (``PROBLEM_BASE`` + kind); clients switch on ``type``,
never on ``title`` or ``detail``. Domain errors, request validation, unknown routes (404), wrong
methods (405), auth failures and unexpected errors are all mapped here, once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.controlplane.domain import errors

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://huvidpo.dev/problems/"
MEDIA_TYPE = "application/problem+json"

STATUS_BY_KIND: dict[str, int] = {
    errors.NotFound.kind: 404,
    errors.Conflict.kind: 409,
    errors.InvalidRequest.kind: 422,
    errors.IdempotencyKeyReused.kind: 422,
    errors.PayloadTooLarge.kind: 413,
    errors.UnsupportedMediaType.kind: 415,
    errors.BadUpload.kind: 400,
    errors.Unavailable.kind: 503,
    "invalid-model-layout": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "method-not-allowed": 405,
    "not-acceptable": 406,
    "internal-error": 500,
    "invalid-json": 400,
    "too-many-requests": 429,
}


class FieldProblem(BaseModel):
    """One field at fault: where it is and what to fix."""

    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem details object."""

    type: str = Field(examples=[PROBLEM_BASE + "not-found"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = None
    errors: list[FieldProblem] | None = None


def problem_type(kind: str) -> str:
    return PROBLEM_BASE + kind


def problem_response(
    status: int,
    kind: str,
    detail: str,
    *,
    instance: str | None = None,
    field: str | None = None,
    field_errors: list[FieldProblem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": problem_type(kind),
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    if field is not None:
        body["field"] = field
    if field_errors:
        body["errors"] = [e.model_dump() for e in field_errors]
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    """A body field as its dotted path (``hyperparameters.lr``, the same name the domain's own checks
    use), a parameter as ``query:page_size`` / ``path:name`` / ``header:...``; the body itself as ``body``."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "body":
        return ".".join(parts[1:])
    if parts and parts[0] in ("body", "query", "path", "header"):
        return ".".join(parts) if len(parts) == 1 else parts[0] + ":" + ".".join(parts[1:])
    return ".".join(parts)


def _message(msg: str) -> str:
    # pydantic prefixes the text of a validator's ValueError with "Value error, ": say only the text.
    return msg.removeprefix("Value error, ")


def _error_message(e: Any) -> str:
    """A validation error in words: a value outside a declared pattern says the form it must take and
    what was sent (services/controlplane/forms.py), not the regular expression."""
    if e.get("type") == "string_pattern_mismatch":
        from services.controlplane.forms import pattern_mismatch

        worded = pattern_mismatch((e.get("ctx") or {}).get("pattern", ""), e.get("input"))
        if worded is not None:
            return worded
    return _message(e.get("msg", ""))


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _body_problem(request: Request, exc: RequestValidationError) -> JSONResponse | None:
    """415 for a body that is not sent as JSON to a JSON route, 400 for JSON that does not parse.

    FastAPI reports both as validation errors (422): a body of another media type is left as bytes
    and fails the model ("Input should be a valid dictionary"), malformed JSON is a ``json_invalid``
    error. Neither is a field the caller got wrong, so neither is a 422."""
    errs = exc.errors()
    for e in errs:
        if e.get("type") == "json_invalid":
            loc = e.get("loc", ())
            at = f" at character {loc[1]}" if len(loc) > 1 else ""
            reason = (e.get("ctx") or {}).get("error", "JSON decode error")
            return problem_response(
                400,
                "invalid-json",
                f"the request body is not valid JSON: {reason}{at}",
                instance=request.url.path,
                field="body",
            )
    route = request.scope.get("route")
    body_field = getattr(route, "body_field", None)
    if body_field is None or isinstance(body_field.field_info, params.Form):
        return None  # no body, or a form/multipart body: not a JSON route
    content_type = request.headers.get("content-type", "")
    if _is_json(content_type) or not any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errs):
        return None
    sent = f"Content-Type {content_type.split(';', 1)[0].strip()}" if content_type else "no Content-Type"
    return problem_response(
        415,
        errors.UnsupportedMediaType.kind,
        f"{request.method} {request.url.path} takes a JSON body; the request has {sent}: "
        "send Content-Type: application/json",
        instance=request.url.path,
        field="body",
    )


def routes_under(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route under ``routes``, through included routers (FastAPI includes them lazily)."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None:
            yield from routes_under(candidates())
        else:
            yield route


def allowed_methods(routes: Iterable[Any], path: str) -> list[str]:
    """The methods the routes take at ``path`` (a 405's ``Allow``), sorted. Starlette's own 405 names
    only the first route whose path matched, so ``PUT /v1/datasets/x`` said ``Allow: GET`` alone. A
    route whose path parameter's declared pattern refuses the segment does not count: ``DELETE
    …/ratings/{rating_id}`` is not a method of ``…/ratings/score``."""
    methods: set[str] = set()
    for route in routes_under(routes):
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        match = regex.match(path) if regex is not None and route_methods else None
        if match is not None and _params_fit(route, match.groupdict()):
            methods |= set(route_methods or ())
    return sorted(methods)


def _params_fit(route: Any, values: dict[str, str]) -> bool:
    dependant = getattr(route, "dependant", None)
    for field in getattr(dependant, "path_params", None) or []:
        for meta in field.field_info.metadata:
            pattern = getattr(meta, "pattern", None)
            if pattern and field.alias in values and not re.search(pattern, values[field.alias]):
                return False
    return True


def method_not_allowed(request: Request, allow: list[str]) -> JSONResponse:
    """405 with ``Allow``: the methods ``request``'s path takes."""
    return problem_response(
        405,
        "method-not-allowed",
        f"{request.method} is not allowed on {request.url.path}; it takes {', '.join(allow)}",
        instance=request.url.path,
        headers={"Allow": ", ".join(allow)},
    )


def _method_problem(request: Request, exc: RequestValidationError) -> JSONResponse | None:
    """405 when only path parameters failed and the path is another route's: ``DELETE
    …/ratings/score`` reached ``DELETE …/ratings/{rating_id}`` (Starlette routes on the path's shape),
    but ``score`` is no rating id; the path is ``PUT …/ratings/score``'s, which takes no DELETE."""
    if not all(tuple(e.get("loc", ()))[:1] == ("path",) for e in exc.errors()):
        return None
    allow = allowed_methods(request.app.routes, request.scope["path"])
    return method_not_allowed(request, allow) if allow and request.method not in allow else None


# Responses every route may return; documented so OpenAPI clients (and schemathesis) know them.
def common_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        s: {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": HTTPStatus(s).phrase}
        for s in statuses
    }


def install(app: FastAPI) -> None:
    """Register the exception handlers that turn every error into problem+json."""

    @app.exception_handler(errors.DomainError)
    async def _domain(request: Request, exc: errors.DomainError) -> JSONResponse:
        status = STATUS_BY_KIND.get(exc.kind, 400)
        headers = {"Retry-After": "5"} if status == 503 else None
        return problem_response(
            status, exc.kind, exc.message, instance=request.url.path, field=exc.field, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        body_problem = _body_problem(request, exc)
        if body_problem is not None:
            return body_problem
        wrong_method = _method_problem(request, exc)
        if wrong_method is not None:
            return wrong_method
        field_errors = [
            FieldProblem(field=_loc_to_field(e.get("loc", ())), message=_error_message(e))
            for e in exc.errors()
        ]
        first = field_errors[0] if field_errors else None
        detail = f"{first.field}: {first.message}" if first else "the request is not valid"
        return problem_response(
            422,
            errors.InvalidRequest.kind,
            detail,
            instance=request.url.path,
            field=first.field if first else None,
            field_errors=field_errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {
            404: errors.NotFound.kind,
            405: "method-not-allowed",
            401: "unauthorized",
            403: "forbidden",
            406: "not-acceptable",
            413: errors.PayloadTooLarge.kind,
            429: "too-many-requests",
            415: errors.UnsupportedMediaType.kind,
            400: errors.BadUpload.kind,
        }.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route matches {request.method} {request.url.path}"
        if exc.status_code == 405:
            return method_not_allowed(request, allowed_methods(request.app.routes, request.scope["path"]))
        return problem_response(
            exc.status_code, kind, detail, instance=request.url.path, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(
            500, "internal-error", "unexpected error; see the server log", instance=request.url.path
        )
