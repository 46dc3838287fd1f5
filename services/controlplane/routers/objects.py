"""``/v1/objects/{key}``: serves the presigned URLs of the embedded ``LocalStore`` (GET and PUT).

The signature in the query string is the authorisation (as with S3 presigned URLs), so there is no
bearer token here. With an S3 store, presigned URLs point at S3 itself and this route answers 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.common.store import LocalStore, ObjectNotFound, PresignedUrlInvalid
from services.controlplane import problems
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.errors import NotFound
from services.controlplane.params import ObjectKeyPath
from services.controlplane.uploads import stream_raw

router = APIRouter(prefix="/v1/objects", tags=["objects"])
ERRORS = problems.common_responses(403, 404, 413, 422)


def _local(c: Context) -> LocalStore:
    if not isinstance(c.store, LocalStore):
        raise NotFound("presigned object URLs are served by the object store itself")
    return c.store


@router.get(
    "/{key:path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
def get_object(
    key: ObjectKeyPath,
    expires: int = Query(..., ge=0, le=2**40),
    signature: str = Query(
        ..., pattern="^[0-9a-f]{64}$", description="hex HMAC-SHA256 from the presigned URL"
    ),
    c: Context = Depends(ctx),
) -> StreamingResponse:
    store = _local(c)
    store.verify_presigned(key, expires, signature, "GET")
    try:
        reader = store.open_read(key)
    except ObjectNotFound as exc:
        raise NotFound("object not found") from exc
    headers = {"Content-Length": str(reader.info.size)}
    if reader.info.sha256:
        headers["X-Checksum-Sha256"] = reader.info.sha256
    return StreamingResponse(
        reader.iter_chunks(),
        media_type=reader.info.content_type or "application/octet-stream",
        headers=headers,
    )


@router.put(
    "/{key:path}",
    responses={200: {"description": "stored"}, **ERRORS},
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        }
    },
)
async def put_object(
    key: ObjectKeyPath,
    request: Request,
    expires: int = Query(..., ge=0, le=2**40),
    signature: str = Query(
        ..., pattern="^[0-9a-f]{64}$", description="hex HMAC-SHA256 from the presigned URL"
    ),
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    store = _local(c)
    await run_in_threadpool(store.verify_presigned, key, expires, signature, "PUT")
    if not await run_in_threadpool(c.datasets.accepts_presigned_put, key):
        raise PresignedUrlInvalid(
            "this presigned URL's upload was committed or discarded; its URLs no longer accept files"
        )
    info = await stream_raw(
        request,
        lambda reader: store.put_stream(key, reader, None, request.headers.get("content-type")),
        c.settings.max_upload_bytes,
        c.metrics.upload_bytes.inc,
    )
    return {"key": info.key, "size": info.size, "sha256": info.sha256}


__all__ = ["PresignedUrlInvalid", "router"]
