"""``/v1/datasets``: datasets, uploads (streamed multipart or presigned), ratings, versions, pairs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from services.common.auth import Principal
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.datasets import PairOptions
from services.controlplane.domain.errors import InvalidRequest
from services.controlplane.domain.names import validate_name
from services.controlplane.domain.retention import Retention
from services.controlplane.params import (
    NamePath,
    PageSize,
    PageToken,
    RatingIdPath,
    UploadIdPath,
    VersionPath,
)
from services.controlplane.schemas import (
    CommitRequest,
    Dataset,
    DatasetCreate,
    DatasetList,
    DatasetVersion,
    DatasetVersionList,
    DeriveRequest,
    PairsReport,
    PairsRequest,
    PresignRequest,
    PresignResponse,
    RatingList,
    RatingsCreate,
    RatingsCreated,
    UploadResult,
    UploadSession,
)
from services.controlplane.uploads import MultipartStream, stream_multipart

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": "one part per file; the part's filename is its path in the dataset",
                        }
                    },
                    "required": ["files"],
                }
            }
        },
    }
}
UPLOAD_ERRORS = problems.common_responses(400, 401, 403, 404, 413, 415, 422, 503)


@router.post(
    "",
    dependencies=[needs("data")],
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    responses=problems.common_responses(401, 403, 409, 422),
)
def create_dataset(body: DatasetCreate, c: Context = Depends(ctx)) -> dict[str, Any]:
    c.datasets.create(body.name, body.description)
    return c.datasets.get(body.name)


@router.get(
    "",
    dependencies=[needs("read", "rate")],
    response_model=DatasetList,
    responses=problems.common_responses(401, 422),
)
def list_datasets(
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.datasets.list(page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{name}",
    dependencies=[needs("read", "rate")],
    response_model=Dataset,
    responses=problems.common_responses(401, 404, 422),
)
def get_dataset(name: NamePath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.datasets.get(name)


@router.delete(
    "/{name}",
    dependencies=[needs("admin")],
    status_code=204,
    responses=problems.common_responses(401, 403, 404, 409, 422),
)
def delete_dataset(name: NamePath, c: Context = Depends(ctx)) -> Response:
    Retention(c.finetunes, c.checkpoints, c.rollouts, c.models).delete_dataset(name)
    return Response(status_code=204)


# ------------------------------------------------------------------------------------------ uploads
def _stager(c: Context, name: NamePath, upload_id: str):  # type: ignore[no-untyped-def]
    def consume(stream: MultipartStream) -> list[dict[str, Any]]:
        files: list[dict[str, Any]] = []
        seen: set[str] = set()
        while (nxt := stream.next_part()) is not None:
            part, reader = nxt
            if part.filename is None:
                reader.read_small()  # a plain form field: nothing we need
                continue
            if part.filename in seen:
                raise InvalidRequest(f"file {part.filename!r} appears twice in the upload", field="files")
            seen.add(part.filename)
            info = c.datasets.stage_stream(name, upload_id, part.filename, reader, part.content_type)  # type: ignore[arg-type]
            files.append({"path": part.filename, "size": info.size, "sha256": info.sha256})
        if not files:
            raise InvalidRequest("the upload holds no file parts (each file needs a filename)", field="files")
        return files

    return consume


@router.post(
    "/{name}/versions",
    status_code=201,
    response_model=DatasetVersion,
    openapi_extra=MULTIPART_BODY,
    responses=UPLOAD_ERRORS,
    summary="Upload a dataset directory (streamed multipart) and commit it as a new version",
)
async def upload_version(
    name: NamePath,
    request: Request,
    include_ratings: bool = Query(True),
    c: Context = Depends(ctx),
    who: Principal = needs("data"),
) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    validate_name(name, "dataset")
    session = await run_in_threadpool(c.datasets.start_upload, name)
    try:
        await stream_multipart(
            request,
            _stager(c, name, session["id"]),
            c.settings.max_upload_bytes,
            c.metrics.upload_bytes.inc,
        )
        return await run_in_threadpool(
            c.datasets.commit_upload, name, session["id"], include_ratings, who.name
        )
    except BaseException:
        # a one-shot upload that failed leaves nothing behind (the caller never saw the session)
        await run_in_threadpool(c.datasets.discard_upload, name, session["id"])
        raise


@router.post(
    "/{name}/uploads",
    dependencies=[needs("data")],
    status_code=201,
    response_model=UploadSession,
    responses=problems.common_responses(401, 403, 404, 422),
)
def start_upload(name: NamePath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return {**c.datasets.start_upload(name), "files": {}}


@router.get(
    "/{name}/uploads/{upload_id}",
    dependencies=[needs("read", "data")],
    response_model=UploadSession,
    responses=problems.common_responses(401, 404, 422),
)
def get_upload(name: NamePath, upload_id: UploadIdPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.datasets.get_upload(name, upload_id)


@router.post(
    "/{name}/uploads/{upload_id}/files",
    dependencies=[needs("data")],
    response_model=UploadResult,
    openapi_extra=MULTIPART_BODY,
    responses=UPLOAD_ERRORS,
    summary="Stream files into an upload session (multipart; memory bounded)",
)
async def upload_files(
    name: NamePath, upload_id: UploadIdPath, request: Request, c: Context = Depends(ctx)
) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(c.datasets.get_upload, name, upload_id)
    files = await stream_multipart(
        request, _stager(c, name, upload_id), c.settings.max_upload_bytes, c.metrics.upload_bytes.inc
    )
    return {"files": files}


@router.post(
    "/{name}/uploads/{upload_id}/presign",
    dependencies=[needs("data")],
    response_model=PresignResponse,
    responses=problems.common_responses(401, 403, 404, 415, 422),
    summary="Presigned PUT URLs for large files, uploaded straight to the object store",
)
def presign(
    name: NamePath, upload_id: UploadIdPath, body: PresignRequest, request: Request, c: Context = Depends(ctx)
) -> dict[str, Any]:
    from datetime import timedelta

    expires = timedelta(seconds=body.expires_seconds)
    urls = c.datasets.presign_upload(name, upload_id, body.files, expires, base_url=str(request.base_url))
    return {"urls": urls, "expires_seconds": body.expires_seconds}


@router.post(
    "/{name}/uploads/{upload_id}/commit",
    status_code=201,
    response_model=DatasetVersion,
    responses=problems.common_responses(401, 403, 404, 422),
)
def commit(
    name: NamePath,
    upload_id: UploadIdPath,
    body: CommitRequest | None = None,
    c: Context = Depends(ctx),
    who: Principal = needs("data"),
) -> dict[str, Any]:
    include = body.include_ratings if body is not None else True
    return c.datasets.commit_upload(name, upload_id, include, created_by=who.name)


# ----------------------------------------------------------------------------------------- versions
@router.get(
    "/{name}/versions",
    dependencies=[needs("read", "rate")],
    response_model=DatasetVersionList,
    responses=problems.common_responses(401, 404, 422),
)
def list_versions(name: NamePath, c: Context = Depends(ctx)) -> dict[str, Any]:
    c.datasets.get(name)
    return {"items": c.datasets.list_versions(name)}


@router.post(
    "/{name}/derive",
    status_code=201,
    response_model=DatasetVersion,
    responses=problems.common_responses(401, 403, 404, 422),
)
def derive(
    name: NamePath, body: DeriveRequest, c: Context = Depends(ctx), who: Principal = needs("data")
) -> dict[str, Any]:
    return c.datasets.derive_version(name, body.base, body.include_ratings, created_by=who.name)


@router.get(
    "/{name}/versions/{version}",
    dependencies=[needs("read", "rate")],
    response_model=DatasetVersion,
    responses=problems.common_responses(401, 404, 422),
)
def get_version(name: NamePath, version: VersionPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.datasets.get_version(name, version)


@router.delete(
    "/{name}/versions/{version}",
    dependencies=[needs("admin")],
    status_code=204,
    responses=problems.common_responses(401, 403, 404, 409, 422),
)
def delete_version(name: NamePath, version: VersionPath, c: Context = Depends(ctx)) -> Response:
    Retention(c.finetunes, c.checkpoints, c.rollouts, c.models).delete_version(name, version)
    return Response(status_code=204)


@router.post(
    "/{name}/versions/{version}/pairs",
    dependencies=[needs("data")],
    response_model=PairsReport,
    responses=problems.common_responses(401, 403, 404, 422),
)
def compile_pairs(
    name: NamePath, version: VersionPath, body: PairsRequest | None = None, c: Context = Depends(ctx)
) -> dict[str, Any]:
    body = body or PairsRequest()
    return c.datasets.compile_pairs(
        name,
        version,
        PairOptions(
            body.tie_policy,
            body.min_margin,
            body.margin_weighting,
            body.seed,
            body.holdout_fraction,
            body.seed if body.holdout_seed is None else body.holdout_seed,
        ),
    )


# ------------------------------------------------------------------------------------------ ratings
@router.post(
    "/{name}/ratings",
    dependencies=[needs("data")],
    status_code=201,
    response_model=RatingsCreated,
    responses=problems.common_responses(401, 403, 404, 422),
)
def add_ratings(name: NamePath, body: RatingsCreate, c: Context = Depends(ctx)) -> dict[str, Any]:
    records = [r.model_dump(exclude_none=True) for r in body.records]
    return {"ids": c.datasets.add_ratings(name, records)}


@router.delete(
    "/{name}/ratings/{rating_id}",
    dependencies=[needs("admin")],
    status_code=204,
    responses=problems.common_responses(401, 403, 404, 422),
)
def delete_rating(name: NamePath, rating_id: RatingIdPath, c: Context = Depends(ctx)) -> Response:
    c.datasets.delete_rating(name, rating_id)
    return Response(status_code=204)


@router.get(
    "/{name}/ratings",
    dependencies=[needs("read")],
    response_model=RatingList,
    responses=problems.common_responses(401, 404, 422),
)
def list_ratings(
    name: NamePath,
    page_size: PageSize = 100,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.datasets.list_ratings(name, page_size, page_token)
    return {"items": items, "next_page_token": token}
