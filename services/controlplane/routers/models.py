"""``/v1/models``: register a base model (streamed multipart upload or an ``imports/`` store prefix),
read and list them. The layout checks and the publication are ``domain/models.py``'s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from services.common.auth import Principal
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from services.controlplane.domain.models import ModelService, StagedFile
from services.controlplane.domain.names import NAME_PATTERN, validate_name
from services.controlplane.domain.retention import Retention
from services.controlplane.params import NamePath, PageSize, PageToken
from services.controlplane.schemas import Model, ModelList, ModelRegister
from services.controlplane.uploads import MultipartStream, stream_multipart

router = APIRouter(prefix="/v1/models", tags=["models"])

MAX_DESCRIPTION = 2000

# One route, two bodies: FastAPI declares one media type per body parameter, so the body is read by
# the route (by Content-Type) and both forms are declared here.
REGISTER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ModelRegister.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": 63},
                        "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one part per file; its filename is the file's path in the "
                            "diffusers layout (unet/config.json, ...). Send id before the files.",
                        },
                    },
                    "required": ["id", "files"],
                }
            },
        },
    }
}


def _multipart_stager(models: ModelService, fields: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The worker that reads the form: ``id`` (first), ``description``, then the files, each
    streamed into the staging prefix as it arrives."""

    def consume(stream: MultipartStream) -> list[StagedFile]:
        staged: list[StagedFile] = []
        seen: set[str] = set()
        while (nxt := stream.next_part()) is not None:
            part, reader = nxt
            if part.filename is None:
                value = reader.read_small().decode("utf-8", "replace")
                if part.name == "id":
                    if "id" in fields:
                        raise InvalidRequest("the form has more than one id field", field="id")
                    fields["staging"] = models.start(value)
                    fields["id"] = value
                elif part.name == "description":
                    if len(value) > MAX_DESCRIPTION:
                        raise InvalidRequest(
                            f"description must be at most {MAX_DESCRIPTION} characters", field="description"
                        )
                    fields["description"] = value
                continue
            if "staging" not in fields:
                raise InvalidRequest("send the id form field before the files", field="id")
            if part.filename in seen:
                raise InvalidRequest(f"file {part.filename!r} appears twice in the upload", field="files")
            seen.add(part.filename)
            staged.append(
                models.stage_stream(fields["staging"], part.filename, reader, part.content_type)  # type: ignore[arg-type]
            )
        if "id" not in fields:
            raise InvalidRequest("the form has no id field", field="id")
        return staged

    return consume


async def _json_body(request: Request, limit: int) -> ModelRegister:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
    try:
        return ModelRegister.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc


@router.post(
    "",
    status_code=201,
    response_model=Model,
    openapi_extra=REGISTER_BODY,
    responses={
        200: {"model": Model, "description": "The same files were registered under this id before"},
        **problems.common_responses(400, 401, 403, 409, 413, 415, 422, 503),
    },
    summary="Register a base model (a diffusers directory) from an upload or an imports/ store prefix",
)
async def register_model(
    request: Request, response: Response, c: Context = Depends(ctx), who: Principal = needs("data")
) -> dict[str, Any]:
    """Multipart: the files are streamed into the store as they arrive (bounded by the upload
    limit), then verified and published. JSON: the files under ``from_prefix`` are verified, then
    copied under ``models/{id}/``. 201 with the new model; 200 when the same files were registered
    under this id before; 409 when other files were; 422 (``invalid-model-layout``, ``field`` naming
    the file or folder) when the files are not a loadable diffusers model with safetensors weights."""
    models: ModelService = c.models
    media, _ = parse_options_header(request.headers.get("content-type", ""))
    fields: dict[str, Any] = {}
    try:
        if media == b"multipart/form-data":
            staged = await stream_multipart(
                request,
                _multipart_stager(models, fields),
                c.settings.max_upload_bytes,
                c.metrics.upload_bytes.inc,
            )
            description = str(fields.get("description", ""))
        elif media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json")):
            body = await _json_body(request, c.settings.max_request_bytes)
            fields["staging"] = models.start(body.id)
            fields["id"] = body.id
            staged = await run_in_threadpool(models.stage_prefix, fields["staging"], body.from_prefix)
            description = body.description
        else:
            raise UnsupportedMediaType(
                "POST /v1/models takes application/json (from_prefix) or multipart/form-data (files)",
                field="Content-Type",
            )
        view, created = await run_in_threadpool(
            models.publish, fields["id"], fields["staging"], staged, description, who.name
        )
    except BaseException:
        if "staging" in fields:
            await run_in_threadpool(models.discard, fields["staging"])
        raise
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/models/{view['id']}"
    return view


@router.get(
    "",
    dependencies=[needs("read")],
    response_model=ModelList,
    responses=problems.common_responses(401, 422),
    summary="The registered base models, by id",
)
def list_models(
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.models.list(page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{model_id}",
    dependencies=[needs("read")],
    response_model=Model,
    responses=problems.common_responses(401, 404, 422),
)
def get_model(model_id: NamePath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.models.get(validate_name(model_id, "id"))


@router.delete(
    "/{model_id}",
    dependencies=[needs("admin")],
    status_code=204,
    responses=problems.common_responses(401, 403, 404, 409, 422),
    summary="Delete a base model no fine-tune still holds (409 names what holds it)",
)
def delete_model(model_id: NamePath, c: Context = Depends(ctx)) -> Response:
    Retention(c.finetunes, c.checkpoints, c.rollouts, c.models).delete_model(model_id)
    return Response(status_code=204)
