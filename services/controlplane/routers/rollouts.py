"""``/v1/rollouts``: which checkpoint each inference deployment serves; canary, promote, roll back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from services.common.auth import Principal
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.gate import RolloutGate
from services.controlplane.domain.preference import PreferenceService
from services.controlplane.domain.ratings import RatingService
from services.controlplane.params import NamePath, PageSize, PageToken
from services.controlplane.schemas import (
    GateDecision,
    Rollout,
    RolloutAction,
    RolloutHistoryEntry,
    RolloutList,
    SetCanary,
    SetCurrent,
)

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])


def rollout_gate(c: Context) -> RolloutGate:
    """The rollout gate over the app's services, counting its decisions in the app's metrics."""
    preference = PreferenceService(RatingService(c.datasets, c.datasets.clock))
    return RolloutGate(c.rollouts, preference, on_decision=c.metrics.gate_decision)


WRITE_ERRORS = problems.common_responses(401, 403, 404, 409, 422)


@router.get(
    "",
    dependencies=[needs("read")],
    response_model=RolloutList,
    responses=problems.common_responses(401, 422),
)
def list_rollouts(
    page_size: PageSize = 50,
    page_token: PageToken = None,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    items, token = c.rollouts.list(page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get(
    "/{deployment}",
    dependencies=[needs("read")],
    response_model=Rollout,
    responses=problems.common_responses(401, 404, 422),
)
def get_rollout(deployment: NamePath, c: Context = Depends(ctx)) -> dict[str, Any]:
    return c.rollouts.get(deployment)


@router.put(
    "/{deployment}",
    response_model=Rollout,
    responses=WRITE_ERRORS,
    summary='Serve one checkpoint (or "base", the base model) to all traffic',
)
def set_current(
    deployment: NamePath,
    body: SetCurrent,
    create: bool = Query(
        False, description="Create the deployment if it has no rollout yet (else 404: a mistyped name)"
    ),
    c: Context = Depends(ctx),
    who: Principal = needs("rollout"),
) -> dict[str, Any]:
    return c.rollouts.set_current(
        deployment, body.checkpoint, body.expected_revision, create=create, actor=who.name
    )


@router.post("/{deployment}/canary", response_model=Rollout, responses=WRITE_ERRORS)
def set_canary(
    deployment: NamePath, body: SetCanary, c: Context = Depends(ctx), who: Principal = needs("rollout")
) -> dict[str, Any]:
    return c.rollouts.set_canary(
        deployment,
        body.checkpoint,
        body.percent,
        body.expected_revision,
        actor=who.name,
        policy=body.policy.model_dump() if body.policy else None,
    )


@router.post("/{deployment}/promote", response_model=Rollout, responses=WRITE_ERRORS)
def promote(
    deployment: NamePath,
    body: RolloutAction | None = None,
    c: Context = Depends(ctx),
    who: Principal = needs("rollout"),
) -> dict[str, Any]:
    return c.rollouts.promote(deployment, body.expected_revision if body else None, actor=who.name)


@router.post("/{deployment}/rollback", response_model=Rollout, responses=WRITE_ERRORS)
def rollback(
    deployment: NamePath,
    body: RolloutAction | None = None,
    c: Context = Depends(ctx),
    who: Principal = needs("rollout"),
) -> dict[str, Any]:
    return c.rollouts.rollback(deployment, body.expected_revision if body else None, actor=who.name)


@router.post(
    "/{deployment}/evaluate",
    response_model=GateDecision,
    responses=problems.common_responses(401, 403, 404, 409, 422),
    summary="Check the canary against its policy now: promote, roll back, or wait (recorded with reasons)",
)
def evaluate(
    deployment: NamePath, c: Context = Depends(ctx), who: Principal = needs("rollout")
) -> dict[str, Any]:
    return rollout_gate(c).evaluate(deployment)


@router.get(
    "/{deployment}/history",
    dependencies=[needs("read")],
    response_model=list[RolloutHistoryEntry],
    responses=problems.common_responses(401, 404, 422),
)
def history(deployment: NamePath, c: Context = Depends(ctx)) -> list[dict[str, Any]]:
    return c.rollouts.history(deployment)
