"""``/v1/evaluations``: evaluate a checkpoint on held-out pairs and a prompt set (a Job), read the
record and its comparison plot."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse

from services.common.auth import Principal
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.evaluations import EvaluationRequest
from services.controlplane.params import CHECKPOINT_ID_PATTERN, EvaluationIdPath, PageSize, PageToken
from services.controlplane.schemas import Evaluation, EvaluationCreate, EvaluationList

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=201,
    response_model=Evaluation,
    responses={
        200: {"model": Evaluation, "description": "A retry with the same Idempotency-Key: the existing one"},
        **problems.common_responses(401, 403, 409, 422, 503),
    },
    summary="Evaluate a checkpoint (held-out pairs, video statistics, CLIP) as a Job",
)
def create_evaluation(
    body: EvaluationCreate,
    response: Response,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=255),
    c: Context = Depends(ctx),
    who: Principal = needs("train"),
) -> dict[str, Any]:
    pairs = None
    if body.pairs is not None:
        pairs = body.pairs.model_dump(exclude_unset=True)
        if "seed" in pairs and pairs.get("holdout_seed") is None:
            pairs["holdout_seed"] = pairs["seed"]  # as the pairs compile route does
        pairs = {k: v for k, v in pairs.items() if v is not None}
    req = EvaluationRequest(
        checkpoint=body.checkpoint,
        baseline=body.baseline,
        dataset=body.dataset,
        version=body.version,
        pairs=pairs,
        prompts=[p.model_dump() for p in body.prompts] if body.prompts else None,
        seeds=body.seeds,
        generation=body.generation.model_dump(exclude_none=True),
        dpo=body.dpo.model_dump(exclude_none=True),
        clip_model=body.clip_model,
        motion_collapse_ratio=body.motion_collapse_ratio,
    )
    view, created = c.evaluations.create(req, idempotency_key, created_by=who.name)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/evaluations/{view['id']}"
    return view


@router.get(
    "",
    dependencies=[needs("read")],
    response_model=EvaluationList,
    responses=problems.common_responses(401, 422),
)
def list_evaluations(
    checkpoint: Annotated[str | None, Query(pattern=CHECKPOINT_ID_PATTERN, max_length=80)] = None,
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None),
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.evaluations.list(checkpoint, state, page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{evaluation_id}",
    dependencies=[needs("read")],
    response_model=Evaluation,
    responses=problems.common_responses(401, 404),
)
def get_evaluation(evaluation_id: EvaluationIdPath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.evaluations.get(evaluation_id)


@router.post(
    "/{evaluation_id}/cancel",
    response_model=Evaluation,
    responses=problems.common_responses(401, 403, 404, 409, 422),
    summary="Cancel an evaluation that has not finished (its Job is stopped; 409 once it has)",
)
def cancel_evaluation(
    evaluation_id: EvaluationIdPath, c: Context = Depends(ctx), who: Principal = needs("train")
) -> dict[str, Any]:
    return c.evaluations.cancel(evaluation_id, by=who.name)


@router.get(
    "/{evaluation_id}/comparison.png",
    dependencies=[needs("read")],
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}}}, **problems.common_responses(401, 404)},
    summary="The comparison plot of a succeeded evaluation (404 before)",
)
def get_comparison(evaluation_id: EvaluationIdPath, c: Context = Depends(ctx)) -> StreamingResponse:
    reader = c.evaluations.plot(evaluation_id)
    headers = {"Content-Length": str(reader.info.size), "Cache-Control": "private, max-age=3600"}
    return StreamingResponse(reader.iter_chunks(), media_type="image/png", headers=headers)
