"""The OpenAPI document tells the truth: every status a route can answer is documented, error bodies are
documented as what they are (``application/problem+json`` with the ``Problem`` schema), and a wrong
method is answered with the methods the path does take.

``document_errors(app)`` runs once in ``create_app`` after every router is included, so routes added
later get the statuses the shared machinery can produce without listing them: 422 for any parameter or
body (FastAPI's validation), 400/413/415 for a body (malformed JSON or multipart, the body limit, a body
that is not JSON), 404 for a path parameter, 503 for a ``/v1`` route that reads the store through the
``Context``. Statuses a route's own logic produces (409, 429, ...) stay the route's ``responses=``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, params
from fastapi.routing import APIRoute

from services.controlplane import problems
from services.controlplane.deps import ctx
from services.controlplane.problems import routes_under

ERROR_MEDIA = problems.MEDIA_TYPE


def _statuses(route: APIRoute) -> set[int]:
    dependants = list(_dependants(route))
    path_params = any(d.path_params for d in dependants)
    has_params = path_params or any(d.query_params or d.header_params or d.cookie_params for d in dependants)
    extra_body = "requestBody" in (route.openapi_extra or {})
    has_body = route.body_field is not None or extra_body
    statuses: set[int] = set()
    if has_params or has_body:
        statuses.add(422)
    if path_params:
        statuses.add(404)
    if has_body:
        statuses |= {400, 413}
        form = route.body_field is not None and isinstance(route.body_field.field_info, params.Form)
        if (route.body_field is not None and not form) or extra_body:
            statuses.add(415)  # a JSON route sent another media type; an upload that is not multipart
    uses_store = any(d.call is ctx for d in dependants)
    if route.path.startswith("/v1/") and uses_store:
        statuses.add(503)
    return statuses


def _dependants(route: APIRoute) -> Iterator[Any]:
    stack = [route.dependant]
    while stack:
        d = stack.pop()
        yield d
        stack += d.dependencies


def document_errors(app: FastAPI) -> None:
    """Document on every route the error statuses the shared machinery produces (see the module doc),
    and document error bodies as ``application/problem+json`` only."""
    for item in routes_under(app.routes):
        route = item if isinstance(item, APIRoute) else getattr(item, "original_route", None)
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        # An included route's effective copy (which the OpenAPI is built from) may already exist: both.
        for responses in {id(r): r for r in (route.responses, item.responses)}.values():
            for status, response in problems.common_responses(*sorted(_statuses(route))).items():
                responses.setdefault(status, response)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        _problem_content_only(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _problem_content_only(schema: dict[str, Any]) -> None:
    """FastAPI puts a ``responses=`` model under the route's own media type (``application/json``)
    beside the ``application/problem+json`` we name; errors are sent as problem+json only."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content") or {}
                if status[:1] in "45" and ERROR_MEDIA in content and "application/json" in content:
                    content[ERROR_MEDIA] = content.pop("application/json")
