"""Human win rates of checkpoints from the rating page's A/B rounds (``domain/preference.py``).

``GET /v1/checkpoints/{id}/preference``: every round comparing the checkpoint, its results from its
side; ``GET /v1/datasets/{name}/versions/{version}/preference``: one round (what the rating page
shows once the round is complete). A round in progress has ``complete: false`` and no results.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from services.common.records.keys import BASE_MODEL
from services.controlplane import problems
from services.controlplane.auth import needs
from services.controlplane.deps import Context, ctx
from services.controlplane.domain.errors import NotFound
from services.controlplane.domain.names import VERSION_PATTERN
from services.controlplane.domain.preference import PreferenceService
from services.controlplane.domain.ratings import RatingService
from services.controlplane.params import CHECKPOINT_ID_PATTERN, NamePath

router = APIRouter(tags=["preference"])

MinRaters = Query(1, ge=1, le=1000, description="raters every pair needs before the round counts as complete")


class WinRate(BaseModel):
    checkpoint: str
    opponent: str = Field(description='the other checkpoint ("*": all opponents pooled)')
    wins: int
    ties: int
    losses: int
    n: int
    win_rate: float | None = Field(description="(wins + ties / 2) / n; null when n is 0")
    wilson_low: float | None = Field(description="lower bound of the Wilson 95% interval of win_rate")
    wilson_high: float | None


class PromptWinRate(WinRate):
    prompt: str


class Ranked(BaseModel):
    rank: int
    checkpoint: str
    strength: float = Field(description="Bradley-Terry strength (they sum to 1)")


class Progress(BaseModel):
    done: int = Field(description="(rater, pair) judgments made by the round's raters")
    total: int


class RoundSummary(BaseModel):
    comparisons: list[WinRate] = Field(description="per checkpoint pair, from the first (sorted) name's side")
    per_prompt: list[PromptWinRate]
    ranking: list[Ranked] | None = Field(description="Bradley-Terry ranking, when more than two checkpoints")


class RoundBase(BaseModel):
    dataset: str
    version: str
    checkpoints: list[str]
    pairs: int
    raters: list[str]
    min_raters: int
    progress: Progress
    complete: bool = Field(
        description="every pair judged by every rater of the round (and min_raters raters)"
    )
    ties: Literal["half"] = Field(description="ties count as half a win and half a loss")


class RoundView(RoundBase):
    summary: RoundSummary | None = Field(description="null until the round is complete")


class CheckpointResults(BaseModel):
    overall: WinRate
    opponents: list[WinRate]
    per_prompt: list[PromptWinRate]
    ranking: list[Ranked] | None


class CheckpointRound(RoundBase):
    results: CheckpointResults | None = Field(description="null until the round is complete")


class CheckpointPreference(BaseModel):
    checkpoint: str
    ties: Literal["half"]
    rounds: list[CheckpointRound]


def _svc(c: Context) -> PreferenceService:
    return PreferenceService(RatingService(c.datasets, c.datasets.clock))


@router.get(
    "/v1/checkpoints/{checkpoint_id}/preference",
    dependencies=[needs("read")],
    response_model=CheckpointPreference,
    responses=problems.common_responses(401, 404, 422),
    summary="Human win rates of a checkpoint in the A/B rounds that compare it",
)
def checkpoint_preference(
    checkpoint_id: Annotated[
        str,
        Path(
            pattern=f"^(base|{CHECKPOINT_ID_PATTERN.strip('^$')})$",
            max_length=80,
            description="a checkpoint id (`ckpt-<finetune_id>-<step>`) or `base`",
        ),
    ],
    min_raters: int = MinRaters,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    if checkpoint_id != BASE_MODEL and not c.checkpoints.exists(checkpoint_id):
        raise NotFound(f"checkpoint {checkpoint_id!r} does not exist (or is not published)")
    return _svc(c).for_checkpoint(checkpoint_id, min_raters)


@router.get(
    "/v1/datasets/{name}/versions/{version}/preference",
    dependencies=[needs("read", "rate")],
    response_model=RoundView,
    responses=problems.common_responses(401, 404, 422),
    summary="The A/B round of a version: progress, and its summary once complete",
)
def round_preference(
    name: NamePath,
    version: str = Path(pattern=VERSION_PATTERN),
    min_raters: int = MinRaters,
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    c.datasets.manifest(name, version)  # 404 for an unknown dataset or version
    rnd = _svc(c).round(name, version)
    if rnd is None:
        raise NotFound(
            f"version {version} of dataset {name!r} is not an A/B round of two or more checkpoints"
        )
    return rnd.view(min_raters)
