"""``/v1/checkpoints``: manifests, digests, lineage and time-limited download URLs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.names import NAME_PATTERN
from services.controlplane.domain.retention import Retention
from services.controlplane.params import CheckpointIdPath, PageSize, PageToken
from services.controlplane.schemas import Checkpoint, CheckpointDownload, CheckpointList

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])


@router.get(
    "",
    dependencies=[needs("read")],
    response_model=CheckpointList,
    responses=problems.common_responses(401, 422),
)
def list_checkpoints(
    finetune_id: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.checkpoints.list(finetune_id, page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{checkpoint_id}",
    dependencies=[needs("read")],
    response_model=Checkpoint,
    responses=problems.common_responses(401, 404),
)
def get_checkpoint(checkpoint_id: CheckpointIdPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    view = c.checkpoints.get(checkpoint_id)
    view["evaluation"] = c.evaluations.checkpoint_summary(checkpoint_id)
    return view


@router.delete(
    "/{checkpoint_id}",
    dependencies=[needs("admin")],
    status_code=204,
    responses=problems.common_responses(401, 403, 404, 409),
    summary="Delete a checkpoint (409 naming the rollout while a deployment serves it)",
)
def delete_checkpoint(checkpoint_id: CheckpointIdPath, c: Context = Depends(ctx)) -> Response:
    Retention(c.finetunes, c.checkpoints, c.rollouts, c.models).delete_checkpoint(checkpoint_id)
    return Response(status_code=204)


@router.get(
    "/{checkpoint_id}/samples/{index}",
    dependencies=[needs("read")],
    response_class=StreamingResponse,
    responses={200: {"content": {"video/mp4": {}}}, **problems.common_responses(401, 404, 422)},
    summary="One sample video the trainer rendered at this checkpoint (mp4)",
)
def get_sample(
    checkpoint_id: CheckpointIdPath, index: int = Path(ge=0, le=15), c: Context = Depends(ctx)
) -> StreamingResponse:
    reader = c.checkpoints.sample_video(checkpoint_id, index)
    headers = {"Content-Length": str(reader.info.size), "Cache-Control": "private, max-age=3600"}
    return StreamingResponse(reader.iter_chunks(), media_type="video/mp4", headers=headers)


@router.get(
    "/{checkpoint_id}/download",
    dependencies=[needs("read")],
    response_model=CheckpointDownload,
    responses=problems.common_responses(401, 404, 422),
)
def download_checkpoint(
    checkpoint_id: CheckpointIdPath,
    request: Request,
    expires_seconds: int = Query(3600, ge=60, le=7 * 24 * 3600),
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    # Links name the address this client reached us at, unless HUVIDPO_STORE_PUBLIC_BASE_URL is set.
    return c.checkpoints.download(checkpoint_id, expires_seconds, base_url=str(request.base_url))
